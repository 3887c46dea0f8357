"""``fastassoc eval`` on feature files and distance matrices (anyone's model), in-process.

Expected figures come from a NumPy CMC / mAP / mINP oracle written here (stable argsort per
query, junk = same identity and camera or identity -1, queries without a match skipped); no
fastassoc code computes them.
"""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

from fastassoc import cli


def oracle(distances, q_pids, g_pids, q_cams, g_cams, max_rank=50):
    cmcs, aps, inps = [], [], []
    for row in range(distances.shape[0]):
        order = np.argsort(distances[row], kind="stable")
        pids, cams = g_pids[order], g_cams[order]
        kept = ~(((pids == q_pids[row]) & (cams == q_cams[row])) | (pids == -1))
        hits = np.nonzero(pids[kept] == q_pids[row])[0] + 1.0
        if not hits.size:
            continue
        cmcs.append((np.arange(1, max_rank + 1) >= hits[0]).astype(float))
        aps.append(np.mean(np.arange(1, hits.size + 1) / hits))
        inps.append(hits.size / hits[-1])
    return {"cmc": np.mean(cmcs, 0), "mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)),
            "num_valid_queries": len(cmcs)}


def problem(seed=0, num_query=17, num_gallery=43, dim=6):
    generator = np.random.default_rng(seed)
    pids = generator.integers(0, 6, num_gallery)
    pids[:3] = -1
    q_pids = generator.integers(0, 7, num_query)
    # Queries near their identity's gallery mean: figures well above chance, yet not perfect.
    centres = generator.standard_normal((7, dim))
    return {"query": (centres[q_pids] + generator.standard_normal((num_query, dim))).astype(np.float32),
            "gallery": (centres[np.maximum(pids, 0)] + generator.standard_normal((num_gallery, dim))
                        ).astype(np.float32),
            "query_pids": q_pids, "gallery_pids": pids, "query_cameras": generator.integers(0, 3, num_query),
            "gallery_cameras": generator.integers(0, 3, num_gallery)}


def squared_distances(arrays):
    q, g = arrays["query"].astype(np.float64), arrays["gallery"].astype(np.float64)
    return ((q[:, None] - g[None]) ** 2).sum(-1)


def labels_of(arrays):
    return [arrays[key] for key in ("query_pids", "gallery_pids", "query_cameras", "gallery_cameras")]


def save(path, arrays):
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    elif path.suffix == ".npy":
        np.save(path, arrays, allow_pickle=True)
    else:
        torch.save({key: torch.from_numpy(np.asarray(value)) for key, value in arrays.items()}, path)
    return path


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_summary(summary, expected, max_rank=50):
    assert summary["num_valid_queries"] == expected["num_valid_queries"]
    np.testing.assert_allclose(summary["cmc"], expected["cmc"][:max_rank], rtol=0, atol=1e-12)
    assert summary["mAP"] == pytest.approx(expected["mAP"], abs=1e-9)
    assert summary["mINP"] == pytest.approx(expected["mINP"], abs=1e-9)
    for rank in (1, 5, 10, 20):
        assert summary[f"rank{rank}"] == pytest.approx(expected["cmc"][rank - 1], abs=1e-12)


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".npy"])
def test_feature_file_gives_the_oracle_figures(tmp_path, capsys, suffix):
    arrays = problem()
    path = save(tmp_path / f"features{suffix}", arrays)
    argv = ["eval", "--features", str(path), "--metric", "sqeuclidean", "--out", str(tmp_path / "out")]
    if suffix == ".npy":  # np.save of a dict pickles it
        argv.append("--allow-pickle")
    code, out, err = run(argv, capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    expected = oracle(squared_distances(arrays), *labels_of(arrays))
    assert_summary(summary, expected)
    assert summary["source"] == "features" and summary["metric"] == "sqeuclidean" and summary["rerank"] is None
    assert (tmp_path / "out" / "cmc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = out.splitlines()
    assert table[0] == "| rank-1 | rank-5 | rank-10 | rank-20 | mAP | mINP |"
    assert table[2] == "| " + " | ".join(f"{100 * value:.1f}" for value in (
        *expected["cmc"][[0, 4, 9, 19]], expected["mAP"], expected["mINP"])) + " |"


def test_pickled_npy_is_refused_without_allow_pickle(tmp_path, capsys):
    path = save(tmp_path / "features.npy", problem())
    code, out, err = run(["eval", "--features", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--allow-pickle" in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_numpy_arrays_inside_a_pt_file_need_allow_pickle(tmp_path, capsys):
    path = tmp_path / "features.pt"
    torch.save(problem(), path)  # NumPy arrays: only a full unpickler reads them
    code, _, err = run(["eval", "--features", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "--allow-pickle" in err
    code, _, err = run(["eval", "--features", str(path), "--out", str(tmp_path / "out"), "--allow-pickle"], capsys)
    assert code == 0, err


def test_distance_file_with_labels_and_bare_matrix_with_labels_file(tmp_path, capsys):
    arrays = problem(1)
    distances = squared_distances(arrays)
    expected = oracle(distances, *labels_of(arrays))
    labels = {key: arrays[key] for key in ("query_pids", "gallery_pids", "query_cameras", "gallery_cameras")}
    np.savez(tmp_path / "distances.npz", distances=distances, **labels)
    code, _, err = run(["eval", "--distances", str(tmp_path / "distances.npz"), "--max-rank", "12",
                        "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert_summary(json.loads((tmp_path / "a" / "eval.json").read_text()), expected, max_rank=12)

    np.save(tmp_path / "matrix.npy", distances.astype(np.float32))
    np.savez(tmp_path / "labels.npz", **labels)
    code, _, err = run(["eval", "--distances", str(tmp_path / "matrix.npy"), "--labels", str(tmp_path / "labels.npz"),
                        "--max-rank", "12", "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert_summary(summary, expected, max_rank=12)
    assert summary["source"] == "distances" and len(summary["cmc"]) == 12


def test_features_and_distances_paths_agree(tmp_path, capsys):
    """The same model evaluated from its features and from their squared distances."""
    arrays = problem(2)
    save(tmp_path / "features.npz", arrays)
    np.savez(tmp_path / "distances.npz", distances=squared_distances(arrays),
             **dict(zip(("query_pids", "gallery_pids", "query_cameras", "gallery_cameras"), labels_of(arrays))))
    assert cli.main(["eval", "--features", str(tmp_path / "features.npz"), "--out", str(tmp_path / "f")]) == 0
    assert cli.main(["eval", "--distances", str(tmp_path / "distances.npz"), "--out", str(tmp_path / "d")]) == 0
    by_features = json.loads((tmp_path / "f" / "eval.json").read_text())
    by_distances = json.loads((tmp_path / "d" / "eval.json").read_text())
    for key in ("cmc", "num_valid_queries"):
        assert by_features[key] == by_distances[key]
    assert by_features["mAP"] == pytest.approx(by_distances["mAP"], rel=1e-12)


def test_rerank_options_reach_evaluate_ranking(tmp_path, capsys, monkeypatch):
    import fastassoc

    calls = []
    original = fastassoc.evaluate_ranking

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(fastassoc, "evaluate_ranking", spy)
    save(tmp_path / "features.npz", problem(3))
    code, _, err = run(["eval", "--features", str(tmp_path / "features.npz"), "--rerank", "--k1", "5", "--k2", "2",
                        "--lambda", "0.5", "--normalize", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert calls[-1]["rerank"] == {"k1": 5, "k2": 2, "lambda_value": 0.5}
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["rerank"] == {"k1": 5, "k2": 2, "lambda_value": 0.5} and summary["normalize"] is True


def test_file_evaluation_needs_no_train_extra(tmp_path, capsys, monkeypatch):
    """torchvision / PIL / tqdm / matplotlib missing: feature files still evaluate; the PNG is skipped in one line."""
    for name in ("torchvision", "PIL", "tqdm", "matplotlib"):
        monkeypatch.setitem(sys.modules, name, None)
    save(tmp_path / "features.npz", problem(4))
    code, out, err = run(["eval", "--features", str(tmp_path / "features.npz"), "--out", str(tmp_path / "out")],
                         capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "eval.json").exists() and not (tmp_path / "out" / "cmc.png").exists()
    assert "matplotlib is not installed" in out
    code, _, err = run(["eval", "--checkpoint", str(tmp_path / "features.npz"), "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and err.strip().endswith("pip install fastassoc[train]") and len(err.splitlines()) == 1


def _bad_file(tmp_path, arrays):
    np.savez(tmp_path / "bad.npz", **arrays)
    return str(tmp_path / "bad.npz")


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.pop("gallery_cameras"), "missing gallery_cameras"),
    (lambda a: a.update(query_pids=a["query_pids"][:-1]), r"bad\.npz: query_pids must have length 17"),
    (lambda a: a.update(gallery=a["gallery"][:, :3]), r"bad\.npz: feature dimensions must match"),
    (lambda a: a.update(query_pids=a["query_pids"].astype(str)), "'query_pids' holds <U"),
    (lambda a: a.update(query_pids=np.full(17, 99)), r"bad\.npz: evaluate_ranking: .*true match"),
])
def test_bad_feature_files_get_one_line_naming_the_file(tmp_path, capsys, edit, message):
    arrays = problem()
    edit(arrays)
    code, _, err = run(["eval", "--features", _bad_file(tmp_path, arrays), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("fastassoc: error: ") and re.search(message, err), err


@pytest.mark.parametrize("argv, message", [
    (["--rerank"], "--rerank applies to --features, not --distances"),
    (["--metric", "cosine"], "--metric applies to --features"),
    (["--root", "."], "--root applies to --checkpoint"),
    (["--max-rank", "0"], "argument --max-rank: must be >= 1, got 0"),
])
def test_options_that_do_not_apply_are_refused(tmp_path, capsys, argv, message):
    path = tmp_path / "d.npz"
    np.savez(path, distances=np.zeros((1, 1)), query_pids=[0], gallery_pids=[0], query_cameras=[0],
             gallery_cameras=[1])
    code, _, err = run(["eval", "--distances", str(path), "--out", str(tmp_path / "out"), *argv], capsys)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["--k1", "5"], "--k1 is a re-ranking parameter; add --rerank"),
    (["--rerank", "--k1", "3", "--k2", "4"], "--k2 must be <= --k1 (3)"),
    (["--rerank", "--lambda", "1.5"], "argument --lambda: must lie in [0, 1], got 1.5"),
    (["--labels", "x.npz"], "--labels applies to --distances"),
])
def test_rerank_arguments_are_checked_first(tmp_path, capsys, argv, message):
    save(tmp_path / "features.npz", problem())
    code, _, err = run(["eval", "--features", str(tmp_path / "features.npz"), "--out", str(tmp_path / "o"), *argv],
                       capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_a_source_is_required_and_files_must_exist(tmp_path, capsys):
    code, _, err = run(["eval", "--out", str(tmp_path)], capsys)
    assert code == 2 and "one of the arguments --checkpoint --features --distances is required" in err
    code, _, err = run(["eval", "--features", str(tmp_path / "none.npz"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "none.npz: no such file" in err
    (tmp_path / "f.csv").write_text("1,2")
    code, _, err = run(["eval", "--features", str(tmp_path / "f.csv"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "must be a .pt, .npy or .npz file" in err


def test_damaged_or_foreign_checkpoints_get_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    code, _, err = run(["eval", "--checkpoint", str(empty), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and str(empty) in err, err
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    code, _, err = run(["eval", "--checkpoint", str(foreign), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and str(foreign) in err, err


def test_device_and_backend_are_checked_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    save(tmp_path / "features.npz", problem())
    base = ["eval", "--features", str(tmp_path / "features.npz"), "--out", str(tmp_path / "o")]
    code, _, err = run([*base, "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA device" in err, err
    code, _, err = run([*base, "--backend", "triton"], capsys)
    assert code == 2 and "--backend triton" in err, err
    assert not (tmp_path / "o").exists()
