"""Crash-safe resume: a run killed by SIGKILL and resumed from its last checkpoint ends
bit-identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import nested_equal

SCRIPT = textwrap.dedent('''
    import sys, torch, torch.nn.functional as F
    import bilevel as bl
    torch.set_num_threads(1)
    ckpt, out, total, every, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    loader = sys.argv[6]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
    hp, pen = bl.hparams.weight_decay(model, init=1e-3, per="parameter")
    ce = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(512, 8, generator=g), torch.randint(0, 3, (512,), generator=g)
    val = [(X[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    if loader != "list":                     # a shuffled DataLoader: each epoch's order drawn from an RNG
        gen = torch.Generator().manual_seed(7) if loader == "shuffled_generator" else None
        val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:128], y[:128]), batch_size=32,
                                          shuffle=True, generator=gen)
    hopt = bl.HyperOptimizer(model, hp, inner_loss=ce, outer_loss=ce, penalty=pen,
                             inner_optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=0.05),
                             method=bl.Implicit(solver=bl.Neumann(steps=5, alpha=0.1, damping=1.0)),
                             outer_loader=val, hyper_every=2)
    start = hopt.load(ckpt)["step"] if resume else 0
    for step in range(start, total):
        idx = torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(1000 + step))
        hopt.step((X[idx], y[idx]))
        if (step + 1) % every == 0:
            hopt.save(ckpt, extra={"step": step + 1})
        print(f"step {step + 1} done", flush=True)
    torch.save(hopt.state_dict(), out)
''')


def _run(tmp, name, total, every, resume, loader, kill_after=None):
    cmd = [sys.executable, "-c", SCRIPT, str(tmp / "ckpt.pt"), str(tmp / f"{name}.pt"), str(total), str(every),
           "1" if resume else "0", loader]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return
    for line in proc.stdout:                   # kill it mid-run, without warning
        if line.strip() == f"step {kill_after} done":
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.parametrize("loader", ["list", "shuffled", "shuffled_generator"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, loader):
    """Killed mid-epoch of the outer loader (the checkpoint at step 12 is 2 batches into its second
    epoch of 4); a shuffled loader draws each epoch's order from the global RNG or its own generator."""
    total, every = 20, 3
    _run(tmp_path, "straight", total, every, False, loader)
    os.remove(tmp_path / "ckpt.pt")
    _run(tmp_path, "killed", total, every, False, loader, kill_after=13)   # last checkpoint: step 12
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["extra"]["step"] == 12
    _run(tmp_path, "resumed", total, every, True, loader)
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert nested_equal(a, b)
    assert a["counters"]["hyper_steps"] == total // 2


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    from bilevel._io import atomic_save

    path = tmp_path / "c.pt"
    atomic_save({"v": torch.tensor(1)}, path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert int(torch.load(path, weights_only=True)["v"]) == 1
    assert os.listdir(tmp_path) == ["c.pt"]            # the temporary file was removed
