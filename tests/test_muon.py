"""`optimizer: muon` and warmup_stable_decay against independent computations: torch's own Muon on separate
Q, K and V matrices, torch's AdamW on the rest, an uninterrupted run for resume, and the schedule by hand."""

import json
import math
import os
import re
import signal
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from lmpipe.cli import main
from lmpipe.config.rules import check_optimizer
from lmpipe.errors import LmpipeError
from lmpipe.training.optimizers import muon_with_adamw

from conftest import arm, tiny_run

MUON_ARGS = SimpleNamespace(
    learning_rate=0.01, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, optim="adamw_torch",
    muon_learning_rate=0.05, muon_weight_decay=0.2, muon_momentum=0.9, muon_nesterov=None, muon_ns_steps=None,
)
N_EMBD = 16


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=N_EMBD, n_layer=2, n_head=2, tie_word_embeddings=False)
    return GPT2LMHeadModel(config)


def gradients(model, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_the_block_matrices_go_to_muon_and_the_rest_to_adamw():
    model = tiny_model()
    optimizer = muon_with_adamw(model, MUON_ARGS, decay_names=set())
    names = {id(p): name for name, p in model.named_parameters()}
    on_muon = {names[id(p)] for group in optimizer.muon.param_groups for p in group["params"]}
    on_adamw = {names[id(p)] for group in optimizer.adamw.param_groups for p in group["params"]}
    assert on_muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"} <= on_adamw  # 2-D, not Muon's
    assert on_adamw == set(names.values()) - on_muon


def test_one_step_is_torch_muon_on_separate_q_k_v_and_torch_adamw_on_the_rest():
    """Two steps of the model's optimizer against torch.optim.Muon on copies of Q, K and V as three tensors and of
    the MLP's rectangular matrices in nn.Linear's (out, in) layout (Conv1D holds them (in, out)), and
    torch.optim.AdamW on the rest. Square matrices keep their layout: Newton-Schulz in bfloat16 gives a transposed
    square input a result that differs in its last bits."""
    model = tiny_model()
    decay = {name for name, _ in model.named_parameters() if not re.search(r"bias|ln_", name)}
    optimizer = muon_with_adamw(model, MUON_ARGS, decay)
    muon_names = {name for name, p in model.named_parameters() if ".h." in name and p.ndim == 2}
    rectangular = {name for name in muon_names if ".mlp." in name}
    copies = {name: p.detach().clone() for name, p in model.named_parameters()}
    views = {}  # name -> the independent tensors standing for it, and how to put them back together
    for name, tensor in copies.items():
        if name.endswith("c_attn.weight"):
            views[name] = ([q.clone() for q in tensor.chunk(3, dim=1)], lambda ts: torch.cat(ts, dim=1))
        elif name in rectangular:
            views[name] = ([tensor.T.clone()], lambda ts: ts[0].T)  # (out, in), as a Linear holds it
        else:
            views[name] = ([tensor.clone()], lambda ts: ts[0])
    leaves = {name: [t.requires_grad_() for t in ts] for name, (ts, _) in views.items()}
    muon = torch.optim.Muon(
        [t for name in muon_names for t in leaves[name]], lr=0.05, weight_decay=0.2, momentum=0.9,
        adjust_lr_fn="match_rms_adamw",
    )
    adamw = torch.optim.AdamW([
        {"params": [leaves[n][0] for n in copies if n not in muon_names and n in decay], "weight_decay": 0.1},
        {"params": [leaves[n][0] for n in copies if n not in muon_names and n not in decay], "weight_decay": 0.0},
    ], lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    for seed in (1, 2):
        grads = gradients(model, seed)
        optimizer.step()
        for name, grad in grads.items():
            whole = grad.T if name in rectangular else grad
            pieces = grad.chunk(3, dim=1) if name.endswith("c_attn.weight") else [whole]
            for leaf, piece in zip(leaves[name], pieces):
                leaf.grad = piece.clone()
        muon.step()
        adamw.step()
    for name, p in model.named_parameters():
        expected = views[name][1]([t.detach() for t in leaves[name]])
        assert torch.allclose(p.detach(), expected, atol=1e-6), name
        assert not torch.allclose(p.detach(), copies[name]), name  # it moved

    # Control: torch's Muon on the whole fused c_attn orthogonalises Q|K|V together, which is another update.
    whole = copies["transformer.h.0.attn.c_attn.weight"].clone().requires_grad_()
    whole_muon = torch.optim.Muon([whole], lr=0.05, weight_decay=0.2, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    for seed in (1, 2):
        whole.grad = gradients(tiny_model(), seed)["transformer.h.0.attn.c_attn.weight"]
        whole_muon.step()
    split = model.transformer.h[0].attn.c_attn.weight.detach()
    assert (whole.detach() - split).abs().max() > 1e-3


def test_muon_with_fsdp_is_refused():
    training = SimpleNamespace(optimizer="muon", fsdp=["full_shard"], optim="adamw_torch", lr_scheduler_type="linear",
                               lr_scheduler_kwargs={})
    with pytest.raises(LmpipeError, match="^optimizer: muon orthogonalises whole matrices, which FSDP shards"):
        check_optimizer(training)


def test_warmup_and_decay_longer_than_the_run_are_refused_naming_the_keys(tmp_path):
    from lmpipe.config.recipe import parse_recipe
    from lmpipe.training.optimizers import schedule_kwargs

    def wsd(decay_fraction):
        return parse_recipe([
            "--output_dir", str(tmp_path), "--lr_scheduler_type", "warmup_stable_decay", "--warmup_steps", "2",
            "--decay_fraction", str(decay_fraction),
        ]).training

    assert schedule_kwargs(wsd(0.75), 8) == {"num_decay_steps": 6}  # 2 + 6 steps: no stable phase, still valid
    with pytest.raises(LmpipeError) as refused:
        schedule_kwargs(wsd(1.0), 8)
    assert str(refused.value) == (
        "lr_scheduler_type warmup_stable_decay: warmup_steps (2 steps) + decay_fraction (8 steps) is more than the"
        " run's 8 steps: lower warmup_steps or decay_fraction"
    )


def test_warmup_and_decay_as_shares_of_the_run_fit_a_short_run(tmp_path):
    """A recipe with warmup_steps 0.075 (a ratio) and decay_fraction 0.45 (the default) run for a few steps: rounding
    up (warmup ceil(0.075 x 1) = 1, decay at least 1) must not refuse `--max_steps 1`; the decay gets what is left."""
    from lmpipe.config.recipe import parse_recipe
    from lmpipe.training.optimizers import schedule_kwargs

    def wsd(warmup_steps, decay_fraction):
        return parse_recipe([
            "--output_dir", str(tmp_path), "--lr_scheduler_type", "warmup_stable_decay", "--warmup_steps",
            str(warmup_steps), "--decay_fraction", str(decay_fraction),
        ]).training

    shares = wsd(0.075, 0.45)
    assert schedule_kwargs(shares, 408) == {"num_decay_steps": 184}  # round(0.45 x 408); warmup ceil(30.6) = 31
    assert schedule_kwargs(shares, 3) == {"num_decay_steps": 1}  # 1 warmup + 1 stable + 1 decay: it fits
    assert schedule_kwargs(shares, 2) == {"num_decay_steps": 1}
    assert schedule_kwargs(shares, 1) == {"num_decay_steps": 0}  # 1 warmup step, the whole run
    with pytest.raises(LmpipeError, match=r"warmup_steps \(1 steps\) \+ decay_fraction \(1 steps\) is more than"):
        schedule_kwargs(wsd(0.5, 0.75), 1)  # shares over 1: the user's own conflict, refused as before


def test_another_optimizer_is_another_run_but_its_settings_may_change(tmp_path):
    """adamw and muon checkpoints hold different optimizer states: a resume could not load one into the other."""
    from lmpipe.config.recipe import parse_recipe
    from lmpipe.run.files import write_resolved_recipe
    from lmpipe.run.identity import identity_changes

    base = ["--output_dir", str(tmp_path), "--optimizer", "muon"]
    write_resolved_recipe(parse_recipe(base), str(tmp_path))
    assert identity_changes(parse_recipe([*base, "--muon_learning_rate", "0.01"]), str(tmp_path)) == []
    adamw = parse_recipe([*base, "--optimizer", "adamw"])
    assert identity_changes(adamw, str(tmp_path)) == ["optimizer 'muon' -> 'adamw'"]


# ---------------------------------------------------------------- a Muon run: schedule, resume, saved model

MAX_STEPS, LEARNING_RATE, MUON_LEARNING_RATE = 8, 0.003, 0.02
MUON_RUN = tiny_run(
    n_layer=2, dropout=0.1, max_steps=MAX_STEPS, save_steps=4, logging_steps=1, seed=5, validation_split_percentage=25,
    optimizer="muon", learning_rate=LEARNING_RATE, muon_learning_rate=MUON_LEARNING_RATE,
    lr_scheduler_type="warmup_stable_decay", warmup_steps=2, decay_fraction=0.5, min_lr_ratio=0.1, decay_type="linear",
)


def wsd_by_hand(step: int) -> float:
    """The factor of the learning rate after `step` scheduler steps: 2 warmup steps from 0.1, 2 stable, then 4
    (round(0.5 x 8)) linear down to 0.1."""
    if step < 2:
        return 0.1 + 0.9 * step / 2
    if step < 4:
        return 1.0
    return 0.1 + 0.9 * (1 - (step - 4) / 4) if step < 8 else 0.1


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import write_pydoc_corpus

    root = tmp_path_factory.mktemp("muon")
    corpus = write_pydoc_corpus(root / "corpus.txt", 30)
    command = ["pretrain", "--train_file", str(corpus), *MUON_RUN]
    assert main([*command, "--output_dir", str(root / "reference")]) == 0
    return SimpleNamespace(command=command, output=root / "reference")


def optimizer_state(output):
    return torch.load(output / f"checkpoint-{MAX_STEPS}" / "optimizer.pt", weights_only=True)


@pytest.mark.slow
def test_warmup_stable_decay_logs_the_hand_computed_learning_rates(reference):
    history = json.loads((reference.output / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    logged = {row["step"]: row["learning_rate"] for row in history["log_history"] if "loss" in row}
    assert sorted(logged) == list(range(1, MAX_STEPS + 1))
    for step, rate in logged.items():  # the rate step k trained with: the schedule after k - 1 scheduler steps
        assert rate == pytest.approx(LEARNING_RATE * wsd_by_hand(step - 1), rel=1e-9), step
    groups = optimizer_state(reference.output)["param_groups"]  # Muon's groups follow the same schedule
    assert [g["lr"] for g in groups] == pytest.approx(
        [LEARNING_RATE * 0.1] * 2 + [MUON_LEARNING_RATE * 0.1] * 2, rel=1e-9
    )
    assert [g.get("split", 1) for g in groups] == [1, 1, 3, 1]


class SigtermAt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_a_resumed_muon_run_has_the_uninterrupted_runs_optimizer_state(reference, tmp_path, monkeypatch):
    output = tmp_path / "run"
    arm(monkeypatch, SigtermAt())  # stops after step 3 with checkpoint-3
    assert main([*reference.command, "--output_dir", str(output)]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert main([*reference.command, "--output_dir", str(output)]) == 0
    assert json.loads((output / "metrics.json").read_text())["resumed_from"].endswith("checkpoint-3")
    resumed, uninterrupted = optimizer_state(output), optimizer_state(reference.output)
    assert resumed["param_groups"] == uninterrupted["param_groups"]
    assert resumed["state"].keys() == uninterrupted["state"].keys()
    kinds = set()
    for index, state in uninterrupted["state"].items():
        assert state.keys() == resumed["state"][index].keys()
        for key, value in state.items():
            kinds.add(key)
            assert torch.allclose(resumed["state"][index][key], value, atol=1e-6), (index, key)
    assert kinds == {"step", "exp_avg", "exp_avg_sq", "momentum_buffer"}  # AdamW's and Muon's state both

    rates = RecordGroupRates()  # one step more with another Muon rate: applied and recorded
    arm(monkeypatch, rates)
    more = ["--max_steps", "9", "--muon_learning_rate", "0.01"]
    assert main([*reference.command, "--output_dir", str(output), *more]) == 0
    adamw, muon = rates.used[9][0], rates.used[9][-1]  # one schedule: the groups' rates stand as their base rates
    assert adamw > 0 and muon == pytest.approx(adamw * 0.01 / LEARNING_RATE, rel=1e-9)
    assert "- from step 8: muon_learning_rate 0.02 -> 0.01; max_steps 8 -> 9" in (output / "README.md").read_text()


class RecordGroupRates(TrainerCallback):
    def __init__(self):
        self.used = {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.used[state.global_step + 1] = [group["lr"] for group in optimizer.param_groups]


@pytest.mark.slow
def test_a_muon_trained_model_loads_as_plain_gpt2_and_passes_the_loss_check(reference):
    model = GPT2LMHeadModel.from_pretrained(reference.output)
    assert type(model) is GPT2LMHeadModel and math.isfinite(model.transformer.h[0].attn.c_attn.weight.sum().item())
    assert main(["check-loss", str(reference.output)]) == 0
