"""The training loops people run, driving a learned optimizer unchanged but for one line
(``lopt_port.integrations``): Hugging Face's ``Trainer``, Lightning (32-bit, ``16-mixed``,
``bf16-mixed``), timm's ``NativeScaler``, accelerate and a plain ``GradScaler`` loop, each
with gradient accumulation.

Each run is compared with the same loop driven explicitly: the test takes every micro-batch's
loss where the loop itself has it (the loop variable, ``compute_loss``, ``training_step``),
never from the hook under test, and hands their float32 mean (in order) to
``step(loss=...)``. The parameters after the run must be equal bit for bit: the hand-off adds
nothing to the arithmetic, so any difference is a wrong loss.

The frameworks are a test extra (``pyproject.toml``: ``frameworks``); timm is installed without
its dependencies (its package imports torchvision, whose wheel needs torch's CUDA libraries),
so its ``NativeScaler`` is imported from timm's own module without running timm's package
``__init__`` (:func:`_timm_native_scaler`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from lopt_port.integrations import learned_optimizer, track_loss
from tests.test_optimizer_conventions import celo

pytestmark = pytest.mark.slow

STEPS = 3
ACCUMULATE = 2


def _sum(values):
    """The float32 sum ``(l1 + l2) + ...``, in order."""
    total = values[0].detach().float()
    for value in values[1:]:
        total = total + value.detach().float()
    return total


def _mean(values):
    """The float32 mean ``((l1 + l2) + ...) / n`` that ``observe_loss`` forms."""
    return _sum(values) / len(values)


class _HandOver:
    """How one run hands its losses to the optimizer. Hooked: the integration under test
    observes them, and the test spies on every value observed. Explicit: ``opt.step`` (as the
    loop calls it) runs ``step(loss=...)`` with the losses the loop recorded since the last
    step, as a loop that could pass the loss would."""

    def __init__(self, hooked: bool, combine: str = "mean"):
        self.hooked, self.combine = hooked, combine
        self.losses, self.observed, self._window = [], [], []

    def attach(self, opt):
        if self.hooked:
            observe = opt.observe_loss

            def spy(loss, *, combine="mean"):
                self.observed.append((loss.detach().float().clone(), combine))
                observe(loss, combine=combine)

            opt.observe_loss = spy
            return
        step = opt.step

        def explicit_step(closure=None):
            if closure is not None:
                with torch.enable_grad():
                    closure()
            loss = _mean(self._window) if self.combine == "mean" else _sum(self._window)
            self._window.clear()
            return step(loss=loss)

        opt.step = explicit_step

    def record(self, loss):
        """A micro-batch's loss, where the loop itself has it."""
        self.losses.append(loss.detach().float().clone())
        self._window.append(loss)

    def check_observed(self):
        """Hooked: the values observed are the loop's losses, bit for bit, and nothing else."""
        if self.hooked:
            assert len(self.observed) == len(self.losses) == STEPS * ACCUMULATE
            for (value, combine), loss in zip(self.observed, self.losses, strict=True):
                assert combine == self.combine
                assert torch.equal(value, loss), (value, loss)


def _tiny_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]


def _assert_same_parameters(a, b):
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.detach(), y.detach())


def _checked(hand, model, before):
    """The run's parameters, once its hand-over was checked and it was seen to train."""
    hand.check_observed()
    assert _moved(model, before)
    return model.parameters()


def _moved(model, before):
    """The run trained: some parameter changed (an equal pair of frozen runs proves nothing)."""
    return any(not torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before,
                                                            strict=True))


# ----------------------------------------------------------------------- plain GradScaler
def _grad_scaler_run(hooked):
    model = _tiny_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = celo(model.parameters())
    hand = _HandOver(hooked)
    hand.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for i, (x, y) in enumerate(_batches(STEPS * ACCUMULATE)):
        loss = torch.nn.functional.mse_loss(model(x), y)
        hand.record(loss)
        if hooked:
            opt.observe_loss(loss)  # the one added line
        scaler.scale(loss / ACCUMULATE).backward()
        if (i + 1) % ACCUMULATE == 0:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    return _checked(hand, model, before)


def test_grad_scaler_loop_with_accumulation():
    _assert_same_parameters(_grad_scaler_run(True), _grad_scaler_run(False))


# --------------------------------------------------------------------------- track_loss
class _LossModel(torch.nn.Module):
    """Returns a Hugging Face-style output: a dict with ``loss`` (and ``logits``)."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x, y=None, num_items_in_batch=None):
        out = self.body(x)
        if y is None:
            return {"logits": out}
        if num_items_in_batch is not None:
            loss = torch.nn.functional.mse_loss(out, y, reduction="sum") / num_items_in_batch
        else:
            loss = torch.nn.functional.mse_loss(out, y)
        return {"loss": loss, "logits": out}


def test_track_loss_observes_training_forwards_only_and_removes():
    model = _LossModel(_tiny_mlp())
    opt = celo(model.parameters())
    handle = track_loss(model, opt)
    (x, y), = _batches(1)
    model(x, y)
    with torch.no_grad():
        model(x, y)  # evaluation under no_grad: ignored
    model.eval()
    model(x, y)  # eval mode: ignored
    model.train()
    model(x)  # no loss in the output: ignored
    assert len(opt._observed) == 1
    opt._observed.clear()
    model(x, y, num_items_in_batch=8)
    assert opt._combine == "sum"
    handle.remove()
    opt._observed.clear()
    model(x, y)
    assert not opt._observed
    with pytest.raises(TypeError, match="not a lopt-port learned optimizer"):
        track_loss(model, torch.optim.SGD(model.parameters(), lr=0.1))


# ---------------------------------------------------------------------------- accelerate
def _accelerate_run(hooked, mixed_precision):
    accelerate = pytest.importorskip("accelerate")
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE,
                                         mixed_precision=mixed_precision)
    model = _LossModel(_tiny_mlp())
    before = [p.detach().clone() for p in model.parameters()]
    opt = celo(model.parameters())
    hand = _HandOver(hooked)
    hand.attach(opt)
    if hooked:
        track_loss(model, opt)
    model, wrapped = accelerator.prepare(model, opt)
    assert learned_optimizer(wrapped) is opt
    for x, y in _batches(STEPS * ACCUMULATE):
        with accelerator.accumulate(model):
            loss = model(x, y)["loss"]
            hand.record(loss)
            accelerator.backward(loss)
            wrapped.step()
            wrapped.zero_grad()
    return _checked(hand, accelerator.unwrap_model(model), before)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_with_accumulation(mixed_precision):
    _assert_same_parameters(_accelerate_run(True, mixed_precision),
                            _accelerate_run(False, mixed_precision))


# ------------------------------------------------------------------------ timm NativeScaler
def _timm_native_scaler():
    """timm's ``NativeScaler`` from its installed module ``timm/utils/cuda.py``; the packages
    ``timm`` and ``timm.utils`` are stood in for by empty packages on timm's own folders, so
    that their ``__init__`` (which imports torchvision) does not run."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (the test extra `frameworks` installs it)")
    root = list(spec.submodule_search_locations)
    saved = {name: sys.modules.pop(name) for name in list(sys.modules)
             if name == "timm" or name.startswith("timm.")}
    try:
        for name, path in (("timm", root), ("timm.utils", [f"{root[0]}/utils"])):
            package = types.ModuleType(name)
            package.__path__ = path
            sys.modules[name] = package
        return importlib.import_module("timm.utils.cuda").NativeScaler
    finally:
        for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def _timm_run(hooked):
    native_scaler = _timm_native_scaler()
    model = _LossModel(_tiny_mlp())
    before = [p.detach().clone() for p in model.parameters()]
    opt = celo(model.parameters())
    hand = _HandOver(hooked)
    hand.attach(opt)
    if hooked:
        track_loss(model, opt)
    loss_scaler = native_scaler(device="cpu")
    for i, (x, y) in enumerate(_batches(STEPS * ACCUMULATE)):
        loss = model(x, y)["loss"]
        hand.record(loss)
        last = (i + 1) % ACCUMULATE == 0
        loss_scaler(loss / ACCUMULATE, opt, clip_grad=1.0, parameters=model.parameters(),
                    need_update=last)
        if last:
            opt.zero_grad()
    return _checked(hand, model, before)


def test_timm_native_scaler_with_accumulation_and_clipping():
    _assert_same_parameters(_timm_run(True), _timm_run(False))


# -------------------------------------------------------------------- Hugging Face Trainer
class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(2)
        self.rows = [{"input_ids": torch.randint(0, 32, (8,), generator=g)} for _ in range(n)]
        for row in self.rows:
            row["labels"] = row["input_ids"].clone()

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _hf_run(hooked, tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1,
                                     n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    before = [p.detach().clone() for p in model.parameters()]
    opt = celo(model.parameters())
    # GPT-2 takes loss kwargs: with accumulation its loss is a share of the window's loss
    # (normalized by the window's token count), so the window's loss is the shares' sum.
    hand = _HandOver(hooked, combine="sum")
    hand.attach(opt)

    class RecordingTrainer(transformers.Trainer):
        """Records the loss of every training micro-batch (not of evaluation)."""

        training = False

        def training_step(self, *args, **kwargs):
            self.training = True
            try:
                return super().training_step(*args, **kwargs)
            finally:
                self.training = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.training:
                hand.record(loss[0] if return_outputs else loss)
            return loss

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("hooked" if hooked else "explicit")),
        per_device_train_batch_size=2, gradient_accumulation_steps=ACCUMULATE,
        max_steps=STEPS, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, logging_strategy="no")
    trainer = RecordingTrainer(model=model, args=args, train_dataset=_Dataset(12),
                               eval_dataset=_Dataset(4), optimizers=(opt, None))
    assert trainer.model_accepts_loss_kwargs
    if hooked:
        track_loss(model, opt)
    trainer.train()
    assert not opt._observed  # the evaluation after the last step observed nothing
    return _checked(hand, model, before)


def test_hugging_face_trainer_with_accumulation_and_evaluation(tmp_path):
    _assert_same_parameters(_hf_run(True, tmp_path), _hf_run(False, tmp_path))


# ---------------------------------------------------------------------------- Lightning
def _lightning_run(hooked, precision):
    pl = pytest.importorskip("pytorch_lightning")
    from lopt_port.integrations import LightningLossCallback

    hand = _HandOver(hooked)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = _tiny_mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.body(x), y)
            hand.record(loss)
            return loss

        def configure_optimizers(self):
            opt = celo(self.parameters())
            hand.attach(opt)
            return opt

    module = Module()
    before = [p.detach().clone() for p in module.parameters()]
    data = torch.utils.data.DataLoader(_batches(STEPS * ACCUMULATE), batch_size=None)
    # Lightning turns precision="16-mixed" on CPU into bf16-mixed (no loss scaling); the
    # plugin keeps float16 autocast with a GradScaler, as 16-mixed runs on a GPU.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    plugins = ([pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler)]
               if precision == "16-mixed" else [])
    trainer = pl.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUMULATE,
                         precision=None if plugins else precision, plugins=plugins,
                         accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[LightningLossCallback()] if hooked else [])
    trainer.fit(module, data)
    assert trainer.global_step == STEPS
    if plugins:
        assert trainer.precision_plugin.scaler is scaler and scaler._scale is not None
    return _checked(hand, module, before)


@pytest.mark.parametrize("precision", ["32", "16-mixed", "bf16-mixed"])
def test_lightning_with_accumulation(precision):
    _assert_same_parameters(_lightning_run(True, precision), _lightning_run(False, precision))
