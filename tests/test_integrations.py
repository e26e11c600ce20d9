"""The optimizers in mmengine, Lightning, transformers and timm, with the real packages on CPU.

Every fenced block of docs/integrations.md runs here verbatim; fixtures provide the names
a snippet leaves to the user (the model, the data, a directory).
"""

import copy
import importlib
import logging
import pickle
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from largedet_kernels import LAMB, PMDLAMB

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"


def doc_blocks():
    """{section title: [(language, code), ...]} of docs/integrations.md's fenced blocks."""
    blocks = {}
    for section in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        blocks[title] = re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.M | re.S)
    return blocks


def doc_block(section, index):
    return doc_blocks()[section][index][1]


def words(text):
    """text with its line breaks and runs of spaces as single spaces: how the docs wrap a quoted message."""
    return " ".join(text.split())


def test_every_doc_block_is_run_here():
    # The tests below take the blocks by section and position: a new block needs a test.
    languages = {title: [lang for lang, _ in blocks] for title, blocks in doc_blocks().items()}
    assert languages == {
        "mmengine (MMDetection, MMPretrain, ...)": ["python"],
        "Lightning": ["text", "python", "text"],
        "Hugging Face transformers": ["python"],
        "timm": ["python"],
        "Logging trust ratios": ["python", "python", "python"],
    }


# mmengine


@pytest.fixture
def mmengine_unregistered(monkeypatch):
    """mmengine's OPTIMIZERS as if largedet_kernels.integrations.mmengine had never been imported."""
    from mmengine.registry import OPTIMIZERS

    for name in ("PMDLAMB", "LAMB"):
        if OPTIMIZERS.module_dict.get(name) in (PMDLAMB, LAMB):
            monkeypatch.delitem(OPTIMIZERS.module_dict, name)
    monkeypatch.delitem(sys.modules, "largedet_kernels.integrations.mmengine", raising=False)
    monkeypatch.delattr("largedet_kernels.integrations.mmengine", raising=False)
    return OPTIMIZERS


def _toy_detector():
    from mmengine.model import BaseModel

    class ToyDetector(BaseModel):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.head = torch.nn.Linear(8, 2)

        def forward(self, inputs, targets, mode="loss"):
            pred = self.head(self.bn(self.conv(inputs)).relu().mean((2, 3)))
            return dict(loss=F.mse_loss(pred, targets))

    return ToyDetector()


@pytest.fixture
def mmengine_config(tmp_path, mmengine_unregistered):
    """The docs' config, loaded as mmengine loads a config file."""
    from mmengine.config import Config

    config = tmp_path / "pmdlamb_config.py"
    config.write_text(doc_block("mmengine (MMDetection, MMPretrain, ...)", 0))
    cfg = Config.fromfile(str(config))  # runs custom_imports
    assert mmengine_unregistered.get("PMDLAMB") is PMDLAMB and mmengine_unregistered.get("LAMB") is LAMB
    return cfg


@pytest.fixture
def mmengine_batch():
    """One fixed batch, iterated. Targets far from the initial outputs make the gradient
    norm exceed clip_grad's max_norm of 1."""
    return torch.randn(16, 3, 8, 8), 4 * torch.randn(16, 2)


def _runner(cfg, batch, work_dir, iters, model=None, checkpoint=None, resume=False):
    from mmengine.runner import Runner

    return Runner(
        model=model or _toy_detector(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=[dict(inputs=x, targets=y) for x, y in zip(*batch)],
                              sampler=dict(type="InfiniteSampler", shuffle=False), batch_size=len(batch[0]),
                              collate_fn=dict(type="default_collate")),
        train_cfg=dict(by_epoch=False, max_iters=iters), optim_wrapper=cfg.optim_wrapper,
        param_scheduler=cfg.param_scheduler, resume=resume,
        default_hooks=dict(checkpoint=checkpoint and dict(type="CheckpointHook", interval=checkpoint, by_epoch=False)),
    )  # fmt: skip


def test_mmengine_config_trains_with_pmdlamb(tmp_path, mmengine_config, mmengine_batch):
    iters = 10
    runner = _runner(mmengine_config, mmengine_batch, tmp_path / "work_dir", iters)
    runner.train()

    optimizer = runner.optim_wrapper.optimizer
    assert type(optimizer) is PMDLAMB
    assert optimizer.defaults["alpha"] == 0.012
    names = {id(p): name for name, p in runner.model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay == {"conv.weight": 5e-4, "conv.bias": 0.0, "bn.weight": 0.0, "bn.bias": 0.0,
                     "head.weight": 5e-4, "head.bias": 0.0}  # fmt: skip
    assert all(optimizer.state[p]["step"] == iters for g in optimizer.param_groups for p in g["params"])

    hub = runner.message_hub
    # LinearLR from 1/3 (end=4: the full lr from iteration 3), then ×0.1 from iteration 8.
    factors = [1 / 3 + (2 / 3) * i / 3 for i in range(4)] + [1.0] * 4 + [0.1] * 2
    assert hub.get_scalar("train/lr").data[0].tolist() == pytest.approx([0.4 * f for f in factors])
    losses = hub.get_scalar("train/loss").data[0]
    assert len(losses) == iters and all(a > b for a, b in zip(losses, losses[1:])), losses
    # clip_grad logs the norm it clipped from each iteration.
    grad_norms = hub.get_scalar("train/grad_norm").data[0]
    assert len(grad_norms) == iters and min(grad_norms) > 1.0


def test_mmengine_resume_continues_bit_for_bit(tmp_path, mmengine_config, mmengine_batch, monkeypatch):
    model = _toy_detector()
    straight = _runner(mmengine_config, mmengine_batch, tmp_path / "straight", 8, copy.deepcopy(model))
    straight.train()
    _runner(mmengine_config, mmengine_batch, tmp_path / "resumed", 4, copy.deepcopy(model), checkpoint=4).train()

    # mmengine 0.10.7 loads its checkpoints with torch.load's default, weights_only=True since
    # torch 2.6, which refuses its own HistoryBuffer (open-mmlab/mmengine#1655), whatever the optimizer.
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer"):
        _runner(mmengine_config, mmengine_batch, tmp_path / "resumed", 8, resume=True).train()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    resumed = _runner(mmengine_config, mmengine_batch, tmp_path / "resumed", 8, resume=True)
    resumed.train()

    assert resumed.iter == 8 and type(resumed.optim_wrapper.optimizer) is PMDLAMB
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    states = [r.optim_wrapper.optimizer.state_dict()["state"] for r in (straight, resumed)]
    assert states[0].keys() == states[1].keys()
    for i in states[0]:
        assert all(torch.equal(states[0][i][k], states[1][i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert resumed.optim_wrapper.get_lr() == straight.optim_wrapper.get_lr()


def test_mmengine_registration_is_idempotent_and_leaves_other_classes(mmengine_unregistered, monkeypatch):
    integration = importlib.import_module("largedet_kernels.integrations.mmengine")
    assert mmengine_unregistered.get("PMDLAMB") is PMDLAMB and mmengine_unregistered.get("LAMB") is LAMB
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(integration)
        integration.register()
    assert mmengine_unregistered.get("PMDLAMB") is PMDLAMB and mmengine_unregistered.get("LAMB") is LAMB

    class OtherLamb(torch.optim.Optimizer):
        pass

    monkeypatch.setitem(mmengine_unregistered.module_dict, "LAMB", OtherLamb)
    with pytest.warns(UserWarning, match=r"already has 'LAMB' .*OtherLamb.*type=largedet_kernels.LAMB"):
        integration.register()
    assert mmengine_unregistered.get("LAMB") is OtherLamb and mmengine_unregistered.get("PMDLAMB") is PMDLAMB
    # The class itself, as the warning says, still builds this package's LAMB.
    built = mmengine_unregistered.build(dict(type=LAMB, params=[torch.nn.Parameter(torch.randn(3))], lr=0.1))
    assert type(built) is LAMB and built.defaults["lr"] == 0.1


# Lightning


@pytest.fixture
def regression():
    """A small net and one fixed batch of a regression it can learn."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x = torch.randn(32, 8)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(32, 1)
    return net, x, y


def _flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _plain_loop(net, x, y, steps, dtype, max_grad_norm, clip_in_torch=None):
    """What Lightning should do, written out: autocast, GradScaler for fp16, the optimizer's step."""
    net = copy.deepcopy(net)
    optimizer = PMDLAMB(net.parameters(), lr=0.05, weight_decay=5e-4, max_grad_norm=max_grad_norm)
    scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
            loss = F.mse_loss(net(x).float(), y)
        (scaler.scale(loss) if scaler else loss).backward()
        if clip_in_torch:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip_in_torch)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
    return _flat(net)


def _lightning_snippet(tmp_path, monkeypatch, net, x, y, block=("Lightning", 1)):
    """Runs a Lightning snippet in tmp_path (its logs and checkpoint go to the working directory)."""
    monkeypatch.chdir(tmp_path)
    # The snippet's Trainer takes a GPU where there is one; the loops it is compared with run on the CPU.
    monkeypatch.setattr("lightning.pytorch.trainer.connectors.accelerator_connector._select_auto_accelerator",
                        lambda: "cpu")  # fmt: skip
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    scope = dict(net=copy.deepcopy(net), train_loader=loader)
    exec(doc_block(*block), scope)
    return scope, loader


def test_lightning_bf16_mixed_clips_with_max_grad_norm(tmp_path, monkeypatch, regression):
    net, x, y = regression
    scope, _ = _lightning_snippet(tmp_path, monkeypatch, net, x, y)
    trainer, model = scope["trainer"], scope["model"]
    assert trainer.precision == "bf16-mixed" and trainer.global_step == 20
    # Bit for bit the plain bf16 loop with max_grad_norm=1, which clipping changed.
    got = _flat(model.net)
    assert torch.equal(got, _plain_loop(net, x, y, 20, torch.bfloat16, 1.0))
    assert not torch.equal(got, _plain_loop(net, x, y, 20, torch.bfloat16, None))
    assert F.mse_loss(model.net(x), y) < F.mse_loss(net(x), y)


def test_lightning_gradient_clip_val_names_max_grad_norm(tmp_path, monkeypatch, regression):
    import lightning as L

    net, x, y = regression
    scope, loader = _lightning_snippet(tmp_path, monkeypatch, net, x, y)
    options = dict(precision="bf16-mixed", max_steps=1, gradient_clip_val=1.0, logger=False, enable_checkpointing=False)

    documented = words(doc_block("Lightning", 2))
    with pytest.raises(RuntimeError) as error:
        L.Trainer(**options).fit(scope["Regressor"](copy.deepcopy(net)), loader)
    assert documented in words(str(error.value))

    # Without the mixin: Lightning's own error, as the docs quote it.
    class Plain(L.LightningModule):
        training_step = scope["Regressor"].training_step
        configure_optimizers = scope["Regressor"].configure_optimizers

        def __init__(self):
            super().__init__()
            self.net = copy.deepcopy(net)

    with pytest.raises(RuntimeError) as error:
        L.Trainer(**options).fit(Plain(), loader)
    assert words(doc_block("Lightning", 0)) in words(str(error.value))
    assert "max_grad_norm" not in str(error.value)


def test_lightning_fp16_gradscaler_clips_with_max_grad_norm(tmp_path, monkeypatch, regression):
    # precision="16-mixed" becomes bf16 on a CPU; the plugin keeps fp16 and its GradScaler.
    import lightning as L
    from lightning.pytorch.plugins import MixedPrecision

    net, x, y = regression
    scope, loader = _lightning_snippet(tmp_path, monkeypatch, net, x, y)

    class Tight(scope["Regressor"]):
        def configure_optimizers(self):
            return PMDLAMB(self.parameters(), lr=0.05, weight_decay=5e-4, max_grad_norm=1e-3)

    model = Tight(copy.deepcopy(net))
    trainer = L.Trainer(plugins=[MixedPrecision("16-mixed", "cpu")], max_steps=5, logger=False,
                        enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, loader)
    assert isinstance(trainer.precision_plugin.scaler, torch.amp.GradScaler)
    got = _flat(model.net)
    assert torch.equal(got, _plain_loop(net, x, y, 5, torch.float16, 1e-3))
    assert not torch.equal(got, _plain_loop(net, x, y, 5, torch.float16, None))


def test_lightning_mixin_defers_where_lightning_clips(tmp_path, monkeypatch, regression):
    import lightning as L

    net, x, y = regression
    scope, loader = _lightning_snippet(tmp_path, monkeypatch, net, x, y)

    class Unclipped(scope["Regressor"]):
        def configure_optimizers(self):
            return PMDLAMB(self.parameters(), lr=0.05, weight_decay=5e-4)

    model = Unclipped(copy.deepcopy(net))
    L.Trainer(precision="32-true", max_steps=5, gradient_clip_val=1e-3, logger=False,
              enable_checkpointing=False).fit(model, loader)  # fmt: skip
    got = _flat(model.net)
    assert torch.equal(got, _plain_loop(net, x, y, 5, torch.float32, None, clip_in_torch=1e-3))
    assert not torch.equal(got, _plain_loop(net, x, y, 5, torch.float32, None))


def test_lightning_fabric_clips_under_bf16_and_refuses_under_fp16():
    # What the docs say of Fabric: no GradScaler under bf16, so its clipping runs; under fp16 it refuses.
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    def clip(precision):
        fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision(precision, "cpu")])
        net = torch.nn.Linear(4, 1)
        net, optimizer = fabric.setup(net, PMDLAMB(net.parameters()))
        fabric.backward(net(torch.randn(8, 4)).float().pow(2).mean())
        return fabric.clip_gradients(net, optimizer, max_norm=1e-3)

    assert clip("bf16-mixed") > 1e-3
    with pytest.raises(NotImplementedError, match="optimizers handling the unscaling"):
        clip("16-mixed")


# transformers


def test_transformers_trainer_steps_lamb(tmp_path, monkeypatch):
    from transformers import BertConfig, BertForSequenceClassification

    # The snippet's Trainer takes a GPU where there is one; the test stays on the CPU, as use_cpu=True would.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = BertForSequenceClassification(config)
    ids = torch.randint(1, 64, (32, 12))
    labels = (ids[:, 0] >= 32).long()  # learnable from the first token, which the pooler reads
    dataset = [dict(input_ids=i, labels=label) for i, label in zip(ids, labels)]
    with torch.no_grad():
        before = model(input_ids=ids, labels=labels).loss

    scope = dict(model=model, train_dataset=dataset, output_dir=str(tmp_path))
    exec(doc_block("Hugging Face transformers", 0), scope)
    optimizer, scheduler, trainer = scope["optimizer"], scope["scheduler"], scope["trainer"]

    assert trainer.args.device.type == "cpu"
    assert type(optimizer) is LAMB and trainer.optimizer.optimizer is optimizer
    assert trainer.state.global_step == 20
    assert {int(s["step"]) for s in optimizer.state.values()} == {20}
    assert len(optimizer.state) == sum(1 for _ in model.parameters())
    assert scheduler.last_epoch == 20 and scheduler.get_last_lr() == pytest.approx([3e-3, 3e-3])
    decay = [g["weight_decay"] for g in optimizer.param_groups]
    assert decay == [0.01, 0.0]
    assert all(p.dim() == 1 for p in optimizer.param_groups[1]["params"])
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids, labels=labels).loss
    assert after < 0.85 * before


# timm


def test_timm_create_optimizer_v2_builds_pmdlamb(caplog):
    import timm.optim

    scope = {}
    exec(doc_block("timm", 0), scope)
    model, optimizer = scope["model"], scope["optimizer"]
    assert type(optimizer) is PMDLAMB
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decay) == sum(1 for _ in model.parameters())
    assert all(decay[id(p)] == (0.0 if p.dim() <= 1 else 5e-4) for p in model.parameters())
    assert {g["lr"] for g in optimizer.param_groups} == {0.4}

    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    weights = model.fc.weight.detach().clone()
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    assert not torch.equal(weights, model.fc.weight)
    assert all(optimizer.state[p]["step"] == 1 for p in model.parameters())

    lamb = timm.optim.create_optimizer_v2(model, "lookahead_largedetlamb", lr=0.01, weight_decay=0.01)
    assert type(lamb._base_optimizer) is LAMB and lamb.defaults["max_grad_norm"] == 1.0
    assert type(timm.optim.create_optimizer_v2(model, "lamb")) is timm.optim.Lamb

    with caplog.at_level(logging.WARNING):
        importlib.reload(importlib.import_module("largedet_kernels.integrations.timm"))
    assert not caplog.records  # timm warns when a name is registered again
    assert timm.optim.get_optimizer_class("pmdlamb", bind_defaults=False) is PMDLAMB


def test_integrations_package_imports_no_framework():
    import subprocess

    frameworks = ("mmengine", "lightning", "transformers", "timm")
    code = f"import sys, largedet_kernels.integrations; print([m for m in {frameworks} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# Logging trust ratios (docs/telemetry.md)


def _logged_statistics(optimizer, names, module):
    """by_module's statistics of the optimizer's records, named from ``names``, for one module."""
    return optimizer.trust_ratios().with_names(names).by_module()[module]


def test_mmengine_trust_ratio_hook_logs_each_module(tmp_path, mmengine_unregistered, mmengine_batch):
    from mmengine.config import Config
    from mmengine.runner import Runner

    config = tmp_path / "telemetry_config.py"
    config.write_text(doc_block("Logging trust ratios", 0))
    cfg = Config.fromfile(str(config))
    cfg.custom_hooks[0]["interval"] = 4  # the docs' 50, over a run of 8 iterations
    x, y = mmengine_batch
    runner = Runner(
        model=_toy_detector(), work_dir=str(tmp_path / "work_dir"),
        train_dataloader=dict(dataset=[dict(inputs=a, targets=b) for a, b in zip(x, y)],
                              sampler=dict(type="InfiniteSampler", shuffle=False), batch_size=len(x),
                              collate_fn=dict(type="default_collate")),
        train_cfg=dict(by_epoch=False, max_iters=8), optim_wrapper=cfg.optim_wrapper, custom_hooks=cfg.custom_hooks,
    )  # fmt: skip
    runner.train()
    hub, optimizer = runner.message_hub, runner.optim_wrapper.optimizer
    assert optimizer.telemetry
    for module in ("conv", "bn", "head"):
        logged = {stat: hub.get_scalar(f"train/trust_ratio/{module}/{stat}").data[0] for stat in
                  ("min", "median", "max")}  # fmt: skip
        assert all(len(values) == 2 for values in logged.values()), logged  # iterations 4 and 8
        want = _logged_statistics(optimizer, runner.model.named_parameters(), module)
        assert {stat: values[-1] for stat, values in logged.items()} == pytest.approx(want)
        assert logged["min"][-1] <= logged["median"][-1] <= logged["max"][-1]


def test_mmengine_trust_ratio_hook_needs_telemetry(tmp_path, mmengine_unregistered, mmengine_batch):
    from largedet_kernels.integrations.mmengine import TrustRatioHook

    class Runner:
        iter = 3
        optim_wrapper = type("Wrapper", (), {"optimizer": PMDLAMB([torch.nn.Parameter(torch.ones(2))])})()

    with pytest.raises(RuntimeError, match="add telemetry=True"):
        TrustRatioHook(interval=4).after_train_iter(Runner(), 0)
    with pytest.raises(ValueError, match="interval"):
        TrustRatioHook(interval=0)


def test_lightning_logs_trust_ratios_with_log_dict(tmp_path, monkeypatch, regression):
    net, x, y = regression
    scope, _ = _lightning_snippet(tmp_path, monkeypatch, net, x, y, ("Logging trust ratios", 1))
    trainer, model = scope["trainer"], scope["model"]
    assert trainer.global_step == 20
    optimizer = trainer.optimizers[0]
    want = optimizer.trust_ratios().scalars()  # the last step's, logged at step 20
    assert set(want) == {f"trust_ratio/net/{stat}" for stat in ("min", "median", "max")}
    logged = {k: v.item() for k, v in trainer.logged_metrics.items() if k.startswith("trust_ratio/")}
    assert logged == pytest.approx(want, rel=1e-6)
    assert {r.step for r in optimizer.trust_ratios().records.values()} == {20}
    assert set(optimizer.trust_ratios().records) == {n for n, _ in model.named_parameters()}


def test_tensorboard_summary_writer_gets_the_scalars(tmp_path, regression):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    net, x, y = regression
    loader = [(x, y)] * 20
    scope = dict(net=copy.deepcopy(net), train_loader=loader, log_dir=str(tmp_path / "runs"))
    exec(doc_block("Logging trust ratios", 2), scope)
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {f"trust_ratio/{name}/{stat}" for name in ("0", "2") for stat in ("min", "median", "max")}
    want = scope["optimizer"].trust_ratios().scalars()  # the last step's: iteration 20
    for tag in tags:
        written = events.Scalars(tag)
        assert [e.step for e in written] == [10, 20]
        assert written[-1].value == pytest.approx(want[tag], rel=1e-6)
