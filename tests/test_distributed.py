"""Two CPU processes under torchrun (gloo) give the single-process scores, units and accuracy."""

import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, SAMPLES


def _scores_in_two_processes(rank: int, world: int, init: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        sys.path.insert(0, str(ROOT))
        from prunetool.data import calibration, load_data
        from prunetool.load import load
        from prunetool.score import score
        from prunetool.trace import trace

        model = load(SAMPLES / "evci_cnn.pt", arch="samples.nets:EvciCNN").model
        x, y = calibration(load_data(str(SAMPLES / "mnist_subset.npz")), 300).all()
        graph = trace(model, x[:2])
        result = {c: {k: v.tolist() for k, v in score(model, graph, c, x, y).scores.items()} for c in ("mrs", "mrp")}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_sharded_scores_equal_single_process(tmp_path, mnist_small):
    from prunetool.data import calibration, load_data
    from prunetool.load import load
    from prunetool.score import score
    from prunetool.trace import trace

    out = tmp_path / "scores.json"
    mp.spawn(_scores_in_two_processes, args=(2, f"file://{tmp_path / 'rdv'}", str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    model = load(SAMPLES / "evci_cnn.pt", arch="samples.nets:EvciCNN").model
    x, y = calibration(load_data(str(SAMPLES / "mnist_subset.npz")), 300).all()
    graph = trace(model, x[:2])
    for criterion in ("mrs", "mrp"):
        single = score(model, graph, criterion, x, y).scores
        for name, values in single.items():
            assert torch.allclose(torch.tensor(got[criterion][name]), values, rtol=1e-4, atol=1e-6), (criterion, name)


def test_torchrun_shrink_equals_single_process(tmp_path, mnist):
    def run(*prefix, tag):
        out, report = tmp_path / f"{tag}.pt", tmp_path / f"{tag}.json"
        cmd = [*prefix, "-m", "prunetool", "shrink", str(SAMPLES / "evci_cnn.pt"), "--arch", "samples.nets:EvciCNN",
               "--data", mnist, "--ratio", "0.5", "--calib", "300", "--eval", "1000", "-q", "--out", str(out),
               "--json", str(report)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(report.read_text()), proc.stdout

    single, _ = run(sys.executable, tag="single")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    double, stdout = run(torchrun, "--nproc-per-node", "2", "--master-port", "29533", tag="double")
    assert stdout.count("shrink: ") == 1, "only the first process prints"
    assert [layer["units_after"] for layer in double["layers"]] == [layer["units_after"] for layer in single["layers"]]
    assert double["after"]["accuracy"] == single["after"]["accuracy"]
    assert double["before"]["accuracy"] == single["before"]["accuracy"]
    assert double["after"]["params"] == single["after"]["params"]
