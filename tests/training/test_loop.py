"""The shared training core: non-finite steps leave everything alone, a finite one steps Adam and the EMA, and a run
resumed from a checkpoint ends where an uninterrupted one does."""

import os

import torch

from cosmos3.training import loop


def linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def params_of(module):
    return dict(module.named_parameters())


def adamw(params):
    return loop.adamw(params, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)


def mse(module, step):
    x, y = batch(step)
    return (module(x) - y).square().mean()


def snapshot(params, optimizer):
    return ({n: p.detach().clone() for n, p in params.items()},
            {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in params.items()})


def assert_untouched(params, optimizer, before):
    weights, state = before
    for name, p in params.items():
        assert torch.equal(p, weights[name]), name
        assert p.grad is None, name
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, state[name][key]), (name, key)


def test_the_optimizer_state_exists_before_the_first_step():
    params = params_of(linear())
    optimizer = adamw(params)
    assert sorted(loop.checkpoint_state(params, optimizer)) == [
        "model.bias", "model.weight", "optim.bias.exp_avg", "optim.bias.exp_avg_sq", "optim.bias.step",
        "optim.weight.exp_avg", "optim.weight.exp_avg_sq", "optim.weight.step"]


def test_a_non_finite_loss_skips_without_touching_anything():
    module = linear()
    params = params_of(module)
    optimizer = adamw(params)
    before = snapshot(params, optimizer)
    assert loop.guarded_update(mse(module, 0) * float("nan"), params, optimizer, 1.0) == (None, "non-finite loss")
    assert_untouched(params, optimizer, before)
    # the value that decides may be another than `loss` (under data parallelism: the all-reduced one)
    assert loop.guarded_update(mse(module, 0), params, optimizer, 1.0, loss_value=float("inf"))[1] == "non-finite loss"
    assert_untouched(params, optimizer, before)


def test_a_non_finite_gradient_norm_skips():
    module = linear()
    params = params_of(module)
    optimizer = adamw(params)
    before = snapshot(params, optimizer)
    module.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))  # the loss itself is finite
    grad_norm, skipped = loop.guarded_update(mse(module, 0), params, optimizer, 1.0)
    assert skipped == "non-finite gradient norm" and grad_norm == float("inf")
    assert_untouched(params, optimizer, before)


def test_a_finite_step_updates_and_the_ema_moves_by_one_minus_decay():
    module = linear()
    params = params_of(module)
    optimizer = adamw(params)
    ema = {n: p.detach().clone() for n, p in params.items()}
    old = {n: p.detach().clone() for n, p in params.items()}
    loss = mse(module, 0)
    loss.backward()
    expected_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), float("inf")))
    optimizer.zero_grad()
    grad_norm, skipped = loop.guarded_update(mse(module, 0), params, optimizer, 1e-3)
    assert skipped is None and grad_norm == expected_norm  # the norm before clipping
    for name, p in params.items():
        assert not torch.equal(p, old[name]) and p.grad is None, name
        assert float(optimizer.state[p]["step"]) == 1.0
    loop.ema_update(ema, params, 0.9)
    for name, p in params.items():
        torch.testing.assert_close(ema[name], old[name] + 0.1 * (p.detach() - old[name]))


def test_parameters_without_a_gradient_get_a_zero_one_on_request():
    for zero_missing, steps in ((False, 0.0), (True, 1.0)):
        module, unused = linear(), torch.nn.Linear(2, 2)
        params = {**params_of(module), "unused": unused.weight}
        optimizer = adamw(params)
        assert loop.guarded_update(mse(module, 0), params, optimizer, 1.0, zero_missing_grads=zero_missing)[1] is None
        assert float(optimizer.state[unused.weight]["step"]) == steps


class TinyTrainer:
    """The least a trainer has for `loop.run`, `loop.save` and `loop.resume`: a linear fit of seeded batches."""

    def __init__(self, root, max_steps, seed=0, save_every=2):
        self.module = linear(seed)
        self.params = params_of(self.module)
        self.optimizer = adamw(self.params)
        self.ema = {n: p.detach().clone() for n, p in self.params.items()}
        self.root, self.max_steps, self.save_every = str(root), max_steps, save_every
        self.step = self.skipped_steps = 0
        self.events = []

    def log(self, record):
        self.events.append(record)

    def train_step(self):
        grad_norm, skipped = loop.guarded_update(mse(self.module, self.step), self.params, self.optimizer, 1.0)
        if skipped:
            self.skipped_steps += 1
        else:
            loop.ema_update(self.ema, self.params, 0.5)
        self.step += 1
        return {"step": self.step, "grad_norm": grad_norm}

    def train(self, **kw):
        self.resume()
        return loop.run(self, self.train_step, self.max_steps, self.save_every, flush_denormal=True, **kw)

    def state(self):
        return loop.checkpoint_state(self.params, self.optimizer, self.ema)

    def save(self):
        return loop.save(self, self.root, 2, ("skipped_steps",), note="tiny")

    def resume(self):
        return loop.resume(self, self.root, ("skipped_steps",))


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    straight = TinyTrainer(tmp_path / "a", max_steps=6)
    records = straight.train()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and all(r["seconds"] >= 0 for r in records)
    assert sorted(os.listdir(tmp_path / "a")) == ["checkpoint-00000004", "checkpoint-00000006"]

    TinyTrainer(tmp_path / "b", max_steps=3).train()  # saves at 2 and, the end, 3
    resumed = TinyTrainer(tmp_path / "b", max_steps=6, seed=1)  # other initial weights: all must come from the file
    resumed.skipped_steps = 7
    records = resumed.train()
    assert [r["step"] for r in records] == [4, 5, 6]
    assert {"event": "resumed", "path": str(tmp_path / "b" / "checkpoint-00000003"), "step": 3} in resumed.events
    assert resumed.skipped_steps == 0  # restored from the checkpoint too
    for name, p in straight.params.items():
        assert torch.equal(p, resumed.params[name]), name
        assert torch.equal(straight.ema[name], resumed.ema[name]), name
        for key, value in straight.optimizer.state[p].items():
            assert torch.equal(value, resumed.optimizer.state[resumed.params[name]][key]), (name, key)
    assert TinyTrainer(tmp_path / "b", max_steps=6).train() == []  # nothing left to do


def test_stop_ends_the_run_early_with_a_checkpoint(tmp_path):
    trainer = TinyTrainer(tmp_path, max_steps=10, save_every=100)
    logged = []
    records = trainer.train(log=logged.append, stop=lambda: {"event": "enough"} if trainer.step == 3 else None)
    assert [r["step"] for r in records] == [1, 2, 3] and logged == records
    assert trainer.events == [{"event": "enough"}]
    assert os.listdir(tmp_path) == ["checkpoint-00000003"]
    assert TinyTrainer(tmp_path, max_steps=10).resume() == 3
