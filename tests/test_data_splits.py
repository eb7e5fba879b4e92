"""Property tests of grouped stratified splits and nested subsamples over random manifests."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medssl.data.splits import class_counts, leakage_problems, nested_subsamples, split_records
from medssl.errors import MedsslError

LABELS = ["a", "b", "c", "d"]


@st.composite
def manifests(draw, single_image_groups: bool):
    """Random records: labels from 1-4 classes (some null), patients with 1-5 images or null, lesions."""
    n = draw(st.integers(1, 120))
    n_classes = draw(st.integers(1, 4))
    labels = draw(st.lists(st.sampled_from([*LABELS[:n_classes], None]), min_size=n, max_size=n))
    records = []
    for i, label in enumerate(labels):
        if single_image_groups:
            patient = draw(st.sampled_from([f"p{i}", None]))
        else:
            patient = f"p{draw(st.integers(0, max(1, n // 3)))}"
        records.append({"id": f"r{i}", "image": f"/x/{i}.png", "source": "image", "label": label,
                        "patient_id": patient, "lesion_id": f"l{i // 2}"})
    return records


ratio_sets = st.sampled_from([(0.6, 0.2, 0.2), (0.8, 0.1, 0.1), (0.5, 0.5, 0.0), (1 / 3, 1 / 3, 1 / 3), (0.7, 0.3)])


@settings(max_examples=100, deadline=None)
@given(manifests(single_image_groups=True), ratio_sets, st.integers(0, 2**16))
def test_single_image_groups_are_within_one_image_of_ideal(records, ratios, seed):
    names = ("train", "val", "test")[: len(ratios)]
    out = split_records(records, ratios=ratios, names=names, seed=seed)
    total = sum(ratios)
    per_class = Counter(r["label"] for r in records)
    got = Counter((r["split"], r["label"]) for r in out)
    for label, n_class in per_class.items():
        for name, ratio in zip(names, ratios):
            ideal = n_class * ratio / total
            assert abs(got[(name, label)] - ideal) < 1, (label, name, got[(name, label)], ideal)
    assert [r["id"] for r in out] == [r["id"] for r in records]
    assert all(r.get("split") is None for r in records)  # inputs untouched: copies returned


@settings(max_examples=60, deadline=None)
@given(manifests(single_image_groups=False), ratio_sets, st.integers(0, 2**16))
def test_groups_never_cross_splits_and_seed_is_reproducible(records, ratios, seed):
    names = ("train", "val", "test")[: len(ratios)]
    out = split_records(records, ratios=ratios, names=names, seed=seed)
    splits_of_patient: dict[str, set[str]] = {}
    for record in out:
        splits_of_patient.setdefault(record["patient_id"], set()).add(record["split"])
    assert all(len(s) == 1 for s in splits_of_patient.values())
    assert leakage_problems(out, ("patient_id",)) == []
    assert split_records(records, ratios=ratios, names=names, seed=seed) == out
    by_lesion = split_records(records, ratios=ratios, names=names, group_key="lesion_id", seed=seed)
    assert leakage_problems(by_lesion, ("lesion_id",)) == []


def test_split_sizes_follow_ratios_on_a_realistic_manifest():
    records = [{"id": f"r{i}", "label": "ab"[i % 7 == 0], "patient_id": f"p{i // 2}"} for i in range(1000)]
    out = split_records(records, seed=1)
    sizes = Counter(r["split"] for r in out)
    assert abs(sizes["train"] - 600) <= 4 and abs(sizes["val"] - 200) <= 4 and abs(sizes["test"] - 200) <= 4
    counts = class_counts(out)
    assert abs(counts["test"]["b"] - 143 * 0.2) <= 2
    assert split_records(records, seed=2) != out


def test_split_rejects_bad_arguments():
    with pytest.raises(MedsslError, match="ratios"):
        split_records([], ratios=(0.5, 0.5), names=("train", "val", "test"))
    with pytest.raises(MedsslError, match="unknown split"):
        split_records([], ratios=(1.0,), names=("holdout",))
    with pytest.raises(MedsslError, match="fractions"):
        nested_subsamples([], [0.0])


@settings(max_examples=80, deadline=None)
@given(manifests(single_image_groups=False), st.lists(st.floats(0.005, 1.0), min_size=1, max_size=4),
       st.integers(0, 2**16))
def test_subsamples_are_nested_stratified_and_reproducible(records, fractions, seed):
    subsets = nested_subsamples(records, fractions, seed=seed)
    per_class = Counter(r["label"] for r in records)
    ordered = sorted(subsets)
    for small, large in zip(ordered, ordered[1:]):
        assert set(subsets[small]) <= set(subsets[large])
    for fraction, chosen in subsets.items():
        assert chosen == sorted(set(chosen))
        got = Counter(records[i]["label"] for i in chosen)
        for label, n_class in per_class.items():
            assert got[label] == min(n_class, max(1, int(fraction * n_class + 0.5)))
    assert nested_subsamples(records, fractions, seed=seed) == subsets


def test_ten_percent_subset_inside_twenty_five_percent_for_each_seed():
    records = [{"id": f"r{i}", "label": "xyz"[i % 3]} for i in range(300)]
    seen = []
    for seed in (0, 1, 2):
        subsets = nested_subsamples(records, [0.01, 0.1, 0.25], seed=seed)
        assert set(subsets[0.01]) <= set(subsets[0.1]) <= set(subsets[0.25])
        assert [len(subsets[f]) for f in (0.01, 0.1, 0.25)] == [3, 30, 75]
        seen.append(tuple(subsets[0.1]))
    assert len(set(seen)) == 3  # different seeds draw different subsets


def _cli(argv: list[str]) -> int:
    import argparse

    from medssl.cli import data_cmd

    parser = argparse.ArgumentParser(prog="medssl")
    data_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("option", ["--group", "--stratify"])
def test_unknown_group_or_stratify_field_is_a_one_line_error(tmp_path, option):
    from medssl.data.manifest import write_manifest

    records = [{"id": f"r{i}", "image": str(tmp_path / f"{i}.png"), "source": "image", "label": "ab"[i % 2],
                "patient_id": f"p{i // 2}", "site": "s1"} for i in range(12)]
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, records)
    out = tmp_path / "split.jsonl"
    with pytest.raises(MedsslError) as info:
        _cli(["manifest", "split", str(manifest), "-o", str(out), option, "nosuchfield"])
    message = str(info.value)
    assert "\n" not in message and str(manifest) in message and "'nosuchfield'" in message and option in message
    assert "fields available: " in message and "patient_id" in message and "site" in message
    assert not out.exists()
    if option == "--stratify":
        with pytest.raises(MedsslError, match="nosuchfield"):
            _cli(["manifest", "subsample", str(manifest), "-o", str(tmp_path / "sub"), "--split", "all",
                  "--stratify", "nosuchfield"])
    # library level too; a real extra field and the standard fields (null when absent) are accepted
    with pytest.raises(MedsslError, match="nosuchfield"):
        split_records(records, **{"group_key" if option == "--group" else "stratify_key": "nosuchfield"})
    grouped = split_records(records, group_key="site")
    assert len({r["split"] for r in grouped}) == 1  # one site -> one group -> one split
    assert split_records(records, group_key="lesion_id") and _cli(
        ["manifest", "split", str(manifest), "-o", str(out), option, "site"]) == 0
