"""DDP: the sampler and batch rules (in process), and real 2-process gloo jobs under torchrun."""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY
from resnetkit import render
from resnetkit.errors import UserError
from resnetkit.runtime.compiling import cxx
from resnetkit.train import Trainer, build_config
from resnetkit.weights import checkpoint as ckpt
from resnetkit.train import distributed as D

WORKER = str(Path(__file__).with_name("dist_worker.py"))
# conftest's tiny runs (512 Fashion-MNIST training images, 4 optimizer steps of 128 per
# epoch), one epoch at a constant rate.
SMALL = dict({k: v for k, v in TINY.items() if k != "batch_size"}, test_subset=256, epochs=1,
             schedule="constant", workers=0)  # the batch is each test's


def info(rank, world):
    return D.DistInfo(rank=rank, world=world, local_world=world)


@pytest.mark.parametrize("n,per_rank,accum,world", [(1000, 32, 1, 2), (1000, 7, 3, 4), (97, 5, 2, 3),
                                                     (256, 64, 1, 2), (10, 4, 1, 1)])
def test_sampler_covers_each_sample_once_per_epoch(n, per_rank, accum, world):
    b = D.resolve_batches(per_rank, 0, accum, world, 0.1, 0, "none")
    perm = D.epoch_permutation(n, seed=3, epoch=5)
    steps = D.steps_per_epoch(n, b, world, drop_last=False)
    seen = []
    for s in range(steps):
        micro = [D.step_indices(perm, s, b, info(r, world), drop_last=False) for r in range(world)]
        assert all(len(m) == accum and all(len(x) >= 1 for x in m) for m in micro)
        seen += [int(i) for m in micro for x in m for i in x]
    if n % b.global_ >= world * accum or n % b.global_ == 0:
        assert sorted(seen) == list(range(n))  # every sample exactly once
    else:  # too few left over to give every micro-batch one: they are skipped, documented
        assert len(seen) == len(set(seen)) == n - n % b.global_


def test_sampler_drop_last_skips_only_the_remainder_without_overlap():
    b = D.resolve_batches(32, 0, 1, 2, 0.1, 0, "none")
    perm = D.epoch_permutation(1000, 0, 0)
    steps = D.steps_per_epoch(1000, b, 2, drop_last=True)
    assert steps == 1000 // 64
    got = [int(i) for s in range(steps) for r in range(2)
           for x in D.step_indices(perm, s, b, info(r, 2), True) for i in x]
    assert got == perm[:steps * 64].tolist()  # rank 0 then rank 1, in the epoch's order
    with pytest.raises(IndexError):
        D.step_indices(perm, steps, b, info(0, 2), True)


def test_ranks_split_what_one_process_sees():
    perm = D.epoch_permutation(600, 1, 2)
    one = D.resolve_batches(128, 0, 1, 1, 0.1, 0, "none")
    two = D.resolve_batches(128, 128, 1, 2, 0.1, 0, "none")
    assert two.per_rank == 64
    for s in range(4):
        a = D.step_indices(perm, s, one, info(0, 1), True)[0]
        b = torch.cat([D.step_indices(perm, s, two, info(r, 2), True)[0] for r in range(2)])
        assert torch.equal(a, b)


def test_epochs_and_seeds_give_different_orders():
    p0, p1 = D.epoch_permutation(500, 0, 0), D.epoch_permutation(500, 0, 1)
    assert not torch.equal(p0, p1) and sorted(p0.tolist()) == sorted(p1.tolist())
    assert torch.equal(p0, D.epoch_permutation(500, 0, 0))
    assert not torch.equal(p0, D.epoch_permutation(500, 1, 0))


def test_batch_and_lr_rules():
    b = D.resolve_batches(256, 0, 1, 1, 0.2, 0, "linear")
    assert (b.per_rank, b.global_, b.lr) == (256, 256, 0.2)  # one process: unchanged
    b = D.resolve_batches(256, 0, 2, 4, 0.2, 0, "linear")
    assert (b.per_rank, b.global_, b.lr) == (256, 2048, pytest.approx(1.6))
    b = D.resolve_batches(256, 1024, 1, 2, 0.2, 0, "sqrt")
    assert (b.per_rank, b.global_, b.lr) == (512, 1024, pytest.approx(0.4))
    b = D.resolve_batches(128, 512, 2, 2, 0.1, 256, "none")
    assert (b.per_rank, b.lr, b.lr_batch) == (128, 0.1, 256)
    with pytest.raises(UserError, match="global batch 100 cannot be split evenly over 3"):
        D.resolve_batches(256, 100, 1, 3, 0.1, 0, "linear")
    with pytest.raises(UserError, match="lr_scale"):
        build_config(None, lr_scale="cubic")


def test_accumulation_equals_one_big_batch(tmp_path):
    """Two micro-batches of 64 give the same step as one batch of 128 (one process)."""
    a = Trainer(build_config(None, **SMALL, batch_size=128, out_dir=str(tmp_path), name="a"), quiet=True)
    b = Trainer(build_config(None, **SMALL, batch_size=64, accum_steps=2, lr_batch=128,
                             out_dir=str(tmp_path), name="b"), quiet=True)
    assert b.batches.global_ == 128 and b.batches.lr == 0.1 and b.steps_per_epoch == 4
    assert render.train_start(b.describe()) == \
        f"run folder: {tmp_path / 'b'} (fp32, channels_last={b.channels_last}, cpu, 1 processes " \
        f"(), 64 per rank x 2 accumulation = global batch 128, lr 0.1)"
    assert render.train_start(a.describe()).endswith(f"channels_last={a.channels_last}, cpu)")
    # Batch norm sees 64 samples per forward in b, so compare models without batch statistics.
    for t in (a, b):
        t.model.eval()
    x = a.feed.augment(a.train_data.images[:128], 0)
    y = a.train_data.labels[:128]
    la, _ = a.train_step([(x, y)])
    lb, _ = b.train_step([(x[:64], y[:64]), (x[64:], y[64:])])
    assert torch.allclose(la, lb, rtol=1e-5)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def torchrun(*args, timeout=240):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", *args], capture_output=True, text=True, timeout=timeout)
    return r, time.perf_counter() - t


def state_dict_of(run_dir):
    return ckpt.load_state(Path(run_dir) / "last.state.pt")["model"]


def max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def test_every_rank_holds_identical_parameters(tmp_path):
    has_tb = importlib.util.find_spec("tensorboard") is not None  # the extra, in [all]
    # channels_last: the ranks' steps run the fused BN kernels (fused_bn auto) on any CPU
    cfg = dict(SMALL, batch_size=64, crop_padding=2, hflip=True, out_dir=str(tmp_path), name="r",
               tensorboard=has_tb, channels_last=True)
    r, _ = torchrun(WORKER, "train", str(tmp_path), json.dumps(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    # DDP: parameters bitwise the same on both ranks; BN running statistics too, as rank 0's
    # are given to every rank before evaluation and checkpoints.
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    init = Trainer(build_config(None, **cfg), quiet=True).model.state_dict()
    assert max_diff(s0, init) > 1e-3  # and they did train
    info_ = json.loads((tmp_path / "r" / "config.json").read_text())["resolved"]
    assert (info_["world_size"], info_["backend"], info_["global_batch"]) == (2, "gloo", 128)
    assert info_["fused_bn"] is (cxx() is not None)
    rows = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1  # only rank 0 logs
    assert json.loads(rows[0])["epoch"] == 1
    if not has_tb:
        return
    # one TensorBoard event file, rank 0's, with one loss per step of the two ranks together
    events = list((tmp_path / "r" / "tb").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "r" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = json.loads(rows[0])["step"]
    assert [e.step for e in acc.Scalars("step/train_loss")] == list(range(1, steps + 1))


# SyncBN on 2 ranks of 64 vs plain BN on one process of 128 is the same arithmetic summed in
# a different order. Early training of this small net amplifies rounding about 1e5-fold in a
# few steps, so these runs use float64: after 8 steps the two agree to ~4e-10, while per-rank
# BN statistics (2 processes without SyncBN) differ by ~0.5. TOL sits between.
TOL = 1e-8


def test_syncbn_two_processes_match_one_and_resume_across_world_sizes(tmp_path):
    common = dict(SMALL, batch_size=128, global_batch=128, sync_bn=True, lr=0.05,
                  precision="fp64", out_dir=str(tmp_path))
    args = ["--model_overrides", "widths=4,8,8;stem_width=4", "--name", "two"]
    for k, v in common.items():
        if k != "model_overrides":
            args += [f"--{k}", str(v)]
    # 1 epoch on 2 processes through the CLI's own launcher ...
    r = subprocess.run([sys.executable, "-m", "resnetkit", "train", "--nproc", "2", *args],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes (gloo), 64 per rank x 1 accumulation = global batch 128" in r.stdout
    # ... equals 1 epoch on 1 process with the whole batch.
    one = Trainer(build_config(None, **{**common, "name": "one"}), quiet=True)
    one.fit()
    two = state_dict_of(tmp_path / "two")
    assert max_diff(two, one.model.state_dict()) < TOL
    # A 2-process checkpoint continues on 1 process, and a 1-process one on 2 processes.
    a = Trainer.resume(tmp_path / "two", epochs=2, quiet=True)
    assert (a.epoch, a.batches.per_rank, a.batches.global_) == (1, 128, 128)
    a.fit()
    r = subprocess.run([sys.executable, "-m", "resnetkit", "train", "--nproc", "2", "--resume",
                        str(tmp_path / "one"), "--epochs", "2"], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    b = ckpt.load_state(tmp_path / "one" / "last.state.pt")
    assert (b["epoch"], b["global_step"]) == (2, 8)
    assert max_diff(b["model"], a.model.state_dict()) < TOL


def test_failing_rank_stops_the_job_with_its_error(tmp_path):
    cfg = dict(SMALL, batch_size=64, epochs=2, out_dir=str(tmp_path), name="f", dist_timeout=60)
    r, secs = torchrun(WORKER, "fail", str(tmp_path), json.dumps(cfg))
    assert r.returncode != 0
    assert "injected failure on rank 1 at step 3" in r.stdout + r.stderr
    assert secs < 60  # torchrun ends the job when the rank dies, long before the timeout


def test_hung_rank_times_out_with_a_clear_message(tmp_path):
    cfg = dict(SMALL, batch_size=64, epochs=2, out_dir=str(tmp_path), name="h", dist_timeout=5)
    r, secs = torchrun(WORKER, "hang", str(tmp_path), json.dumps(cfg))
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "waited more than 5 s (dist_timeout) for the other processes" in out, out[-3000:]
    assert secs < 60


def test_collective_failures_are_one_sentence_and_other_errors_stay_bugs():
    two = D.DistInfo(rank=1, world=2, backend="gloo")
    e = D.explain_failure(RuntimeError("[gloo] Timed out waiting 5000ms for recv\ndetail"), two, 5)
    assert isinstance(e, UserError) and str(e).startswith("rank 1: a collective operation "
                                                          "waited more than 5 s (dist_timeout)")
    assert str(e).endswith("([gloo] Timed out waiting 5000ms for recv)")
    assert "lost contact" in str(D.explain_failure(RuntimeError("Connection reset by peer"), two, 5))
    assert D.explain_failure(RuntimeError("Connection reset by peer"), D.DistInfo(), 5) is None
    assert D.explain_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), two, 5) is None


def test_cpu_sync_batchnorm_is_plain_batchnorm_on_one_process():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6)
    bn.weight.data.uniform_(0.5, 1.5)
    sync = D.convert_sync_batchnorm(torch.nn.Sequential(bn), torch.device("cpu"))[0]
    assert isinstance(sync, D.CpuSyncBatchNorm) and torch.equal(sync.weight, bn.weight)
    x = torch.randn(4, 6, 5, 5)
    assert torch.allclose(sync(x), torch.nn.functional.batch_norm(
        x, None, None, bn.weight, bn.bias, True), atol=1e-5)
