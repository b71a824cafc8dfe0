"""Clinical preprocessing survives new patients: one spelling per level, unseen levels encoded as the
training mix (and reported), and every model that reads clinical data uses it without genomics."""

import numpy as np
import pandas as pd
import pytest
import torch

from fusion.train.data import Bags, Preprocessor, canonical_level, sorted_levels


def _bags(grades, ages=None) -> Bags:
    n = len(grades)
    clinical = pd.DataFrame({"grade": grades, "age": ages if ages is not None else np.linspace(40, 80, n)})
    return Bags([f"P{i}" for i in range(n)], [np.zeros((0, 4), np.float32)] * n, np.ones(n), np.zeros(n, bool),
                clinical=clinical, clinical_types={"grade": "categorical", "age": "numeric"})


def test_levels_have_one_spelling():
    assert {canonical_level(v) for v in ("1", "1.0", 1, 1.0, " 1 ", np.int64(1))} == {"1"}
    assert {canonical_level(v) for v in ("Positive", "positive ", " POSITIVE")} == {"positive"}
    assert canonical_level(2.5) == "2.5" and canonical_level(True) == "true"
    assert all(canonical_level(v) is None for v in (None, np.nan, "", "  ", "NaN", pd.NA))
    assert sorted_levels(["10", "2", "1"]) == ["1", "2", "10"]  # numbers as numbers
    assert sorted_levels(["b", "a"]) == ["a", "b"]


def test_spellings_of_a_level_encode_alike_and_unseen_levels_are_the_training_mix():
    train = _bags(["1", "2", "2", "3.0", 3, " 1"])
    prep = Preprocessor().fit(train)
    assert prep.categories["grade"] == ["1", "2", "3"]
    np.testing.assert_allclose(prep.category_freq["grade"], [2 / 6, 2 / 6, 2 / 6])
    new = _bags([1.0, "2 ", "4", None])
    grade = prep.transform(new)["clinical"][:, 1:]  # column 0 is age
    np.testing.assert_array_equal(grade[0], [1, 0, 0])
    np.testing.assert_array_equal(grade[1], [0, 1, 0])
    np.testing.assert_allclose(grade[2], prep.category_freq["grade"])  # never seen: the training mix, not zeros
    np.testing.assert_allclose(grade[3], prep.category_freq["grade"])  # missing: the same expectation
    assert prep.unseen_levels(new.clinical.iloc[2]) == [("grade", "4")]
    assert prep.unseen_levels(new.clinical.iloc[0]) == [] and prep.unseen_levels(new.clinical.iloc[3]) == []


def test_a_stored_preprocessor_feeds_columns_in_the_order_the_model_was_trained_with(tmp_path):
    """config.json is written with sorted keys: clinical columns stored as an object came back in
    alphabetical order, so a reloaded fold read 'age' where it was trained on 'zeta' (and vice versa)."""
    from fusion.errors import RunError
    from fusion.storage import read_json, write_json

    n = 8
    clinical = pd.DataFrame({"zeta": np.linspace(0, 1, n), "stage": list("ABAB" * 2), "age": np.linspace(40, 80, n),
                             "grade": ["1", "2"] * 4})
    bags = Bags([f"P{i}" for i in range(n)], [np.zeros((0, 4), np.float32)] * n, np.ones(n), np.zeros(n, bool),
                clinical=clinical, clinical_types={"zeta": "numeric", "stage": "categorical", "age": "numeric",
                                                   "grade": "categorical"})
    prep = Preprocessor().fit(bags)
    write_json(tmp_path / "config.json", {"preprocessor": prep.state()})
    again = Preprocessor.from_state(read_json(tmp_path / "config.json")["preprocessor"])
    assert list(again.numeric) == ["zeta", "age"] and list(again.categories) == ["stage", "grade"]
    np.testing.assert_array_equal(again.transform(bags)["clinical"], prep.transform(bags)["clinical"])
    old = {**prep.state(), "numeric": dict(prep.numeric), "categories": prep.categories}  # the old, lossy layout
    with pytest.raises(RunError, match="clinical column order"):
        Preprocessor.from_state(old)


@pytest.mark.parametrize("name", ["genomics_snn", "coattn", "biofusion"])
def test_clinical_data_count_when_genomics_are_missing(name):
    from fusion.models import create_model

    torch.manual_seed(0)
    model = create_model(name, in_dim=8, genomic_dim=6, clinical_dim=3, groups=[[0, 1, 2], [3, 4, 5]],
                         dropout=0.0).eval()
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    genomics, absent = torch.randn(2, 6), torch.zeros(2, dtype=torch.bool)
    risk = [model(x, mask, genomics=genomics, genomics_mask=absent, clinical=c)["risk"]
            for c in (torch.zeros(2, 3), torch.full((2, 3), 2.0))]
    assert not torch.allclose(risk[0], risk[1])
    # ... and what a patient without genomics has in its genomics row does not matter
    other = model(x, mask, genomics=genomics + 5, genomics_mask=absent, clinical=torch.zeros(2, 3))["risk"]
    assert torch.allclose(other, risk[0], atol=1e-5)


def test_gene_groups_come_from_pathway_prefixes_not_from_probe_ids():
    prep = Preprocessor(genes=[f"{p}_G{i}" for p in ("WNT", "TP53", "MYC") for i in range(4)])
    assert prep.groups == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    probes = Preprocessor(genes=[f"X2007{i:02d}_at" for i in range(40)])  # one "prefix" per gene: no pathways
    assert probes.groups == [list(range(16)), list(range(16, 32)), list(range(32, 40))]
