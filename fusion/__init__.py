"""fusion: multimodal pathology pipeline (whole-slide tiles, genomics, clinical data -> risk)."""


def __getattr__(name: str) -> str:
    # The version is looked up on first use: importlib.metadata costs ~40 ms, paid by every `fusion` call.
    if name != "__version__":
        raise AttributeError(f"module 'fusion' has no attribute '{name}'")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusion")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+source"
