"""Tile feature extraction: an encoder registry and a streaming extractor."""

from fusion.features.encoders import Encoder, available_encoders, create_encoder, register_encoder
from fusion.features.extract import ExtractConfig, extract_slide, read_features

__all__ = ["Encoder", "available_encoders", "create_encoder", "register_encoder",
           "ExtractConfig", "extract_slide", "read_features"]
