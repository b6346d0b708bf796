"""Pushing to the Hub without a network: a loopback fake Hub, the model card, the exact upload, the early errors.

The fake Hub (127.0.0.1 only) answers the five endpoints huggingface_hub uses for a push and records what arrives,
so the uploaded files are checked at the wire, byte for byte, with the real huggingface_hub client.
"""

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import HubStrategy

from lmpipe.cli import main
from lmpipe.run import hub
from lmpipe.run.card import render_model_card
from lmpipe.run.hub import checkpoint_plan, upload_plan

from conftest import DATA, tiny_run, write_pydoc_corpus

FAKE_TOKEN = "hf_lmpipeFakeToken0123456789abcdefXYZ"
WRITER = {"name": "tester", "auth": {"accessToken": {"role": "write"}}}
TINY_RUN = tiny_run(max_steps=4, save_steps=2, logging_steps=2, report_to="tensorboard", seed=3)
MODEL_AND_TOKENIZER = {
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
}
RUN_FILES = {"README.md", "recipe.yaml", "metrics.json", "loss.png"}
NQ_OPEN = DATA / "nq_open_efficientqa_dev.jsonl"
CHECKPOINT_FILES = MODEL_AND_TOKENIZER | {
    "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "lmpipe-manifest.json"
}


class FakeHub:
    """whoami, create repo, validate README, preupload, commit; `drop_after_whoami` closes the port after the check."""

    def __init__(self, account=WRITER, whoami_status=200, drop_after_whoami=False):
        self.account, self.whoami_status, self.drop_after_whoami = account, whoami_status, drop_after_whoami
        self.requests, self.created, self.commits = [], [], []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self, b"")

            def do_POST(self):
                fake.handle(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def handle(self, request, body):
        path = request.path.split("?")[0]
        self.requests.append((request.command, path, request.headers.get("authorization")))
        if path == "/api/whoami-v2":
            self.reply(request, self.whoami_status, self.account)
            if self.drop_after_whoami:
                threading.Thread(target=self.close).start()
        elif path == "/api/repos/create":
            spec = json.loads(body)
            self.created.append(spec)
            self.reply(request, 200, {"url": f"{self.url}/{spec.get('organization') or 'tester'}/{spec['name']}"})
        elif path == "/api/validate-yaml":
            self.reply(request, 200, {})
        elif path.endswith("/preupload/main"):
            files = [f["path"] for f in json.loads(body)["files"]]
            modes = [{"path": path, "uploadMode": "regular", "shouldIgnore": False} for path in files]
            self.reply(request, 200, {"files": modes})
        elif path.endswith("/commit/main"):
            rows = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = [row["value"] for row in rows if row["key"] == "file"]
            self.commits.append({file["path"]: base64.b64decode(file["content"]) for file in files})
            repo = path.removeprefix("/api/models/").removesuffix("/commit/main")
            self.reply(request, 200, {"commitUrl": f"{self.url}/{repo}/commit/1", "commitOid": "1"})
        else:
            self.reply(request, 404, {"error": "not found"})

    @staticmethod
    def reply(request, status, payload):
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.close()  # again after a drop: harmless


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    """`lmpipe pretrain` with push_to_hub in a fresh process: the Hub answers the check, then the network drops."""
    root = tmp_path_factory.mktemp("hub")
    corpus = root / "corpus.txt"
    write_pydoc_corpus(corpus, 20)
    output = root / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "TRANSFORMERS_OFFLINE"))}
    with FakeHub(drop_after_whoami=True) as fake:
        env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=fake.url, HF_TOKEN=FAKE_TOKEN, HF_HOME=str(root / "hf_home"))
        result = subprocess.run(
            [sys.executable, "-m", "lmpipe", "pretrain", "--train_file", str(corpus), "--output_dir", str(output),
             "--push_to_hub", "true", "--hub_strategy", "checkpoint", *TINY_RUN],
            capture_output=True, text=True, env=env, timeout=300,
        )
    return output, result, fake


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Online, with the fake token in HF_TOKEN and no login cache."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    return monkeypatch


def copy_run(run, tmp_path):
    return shutil.copytree(run, tmp_path / run.name)


@pytest.mark.slow
def test_network_drop_after_training_keeps_the_run_and_says_how_to_push(pushed_run):
    output, result, fake = pushed_run
    assert result.returncode == 3, result.stderr[-2000:]
    retry = f"`lmpipe push {output} --hub_model_id tester/run --hub_strategy checkpoint`"
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: push to tester/run failed (ConnectError: ")
    assert last_line.endswith(f"the finished run is intact in {output}; push it later with {retry}")
    assert "pushing a checkpoint to tester/run failed (ConnectError" in result.stderr  # the pushes during training
    # The check reached the Hub with the token from HF_TOKEN; nothing else ever did (the port was closed after it).
    hub_requests = [r for r in fake.requests if r[1] != "/api/agent-harnesses"]  # a probe huggingface_hub may send
    assert hub_requests == [("GET", "/api/whoami-v2", f"Bearer {FAKE_TOKEN}")]
    assert json.loads((output / "metrics.json").read_text())["train_steps"] == 4
    final = AutoModelForCausalLM.from_pretrained(output).state_dict()
    checkpoint = AutoModelForCausalLM.from_pretrained(output / "checkpoint-4").state_dict()
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[k], checkpoint[k]) for k in final)


@pytest.mark.slow
def test_the_token_appears_in_no_output_file_and_no_log(pushed_run):
    output, result, _ = pushed_run
    assert FAKE_TOKEN not in result.stdout + result.stderr
    leaks = [p for p in output.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.slow
def test_model_card_metadata_and_body_match_metrics_json(pushed_run):
    output, _, _ = pushed_run
    metrics = json.loads((output / "metrics.json").read_text())
    card = ModelCard.load(output / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-generation")
    assert card.data.tags == ["lmpipe", "gpt2"] and card.data.datasets is None  # a local file is no Hub dataset
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"perplexity": metrics["perplexity"], "bits_per_byte": metrics["bits_per_byte"]}
    assert {r.dataset_name for r in card.data.eval_results} == {"corpus.txt"}
    assert f"| training tokens | {metrics['train_tokens']:,} |" in card.text
    assert f"| training time (s) | {metrics['train_runtime_s']:,.1f} |" in card.text
    assert f"| perplexity (exact, token-weighted) | {metrics['perplexity']:.2f} |" in card.text
    recipe = (output / "recipe.yaml").read_text()
    assert f"```yaml\n{recipe.rstrip()}\n```" in card.text
    assert yaml.safe_load(recipe)["push_to_hub"] is True and "hub_token" not in recipe


def test_card_names_hub_datasets_the_base_model_and_qa_scores():
    metrics = {"perplexity": 12.5, "bits_per_byte": 1.25, "exact_match": 40.0, "f1": 55.5, "train_tokens": 1000}
    recipe = "dataset_name: karpathy/tinystories\nmodel_name_or_path: openai-community/gpt2\n"
    card = render_model_card("qa-run", metrics, recipe)
    assert card.data.datasets == ["karpathy/tinystories"] and card.data.base_model == "openai-community/gpt2"
    assert card.data.library_name == "transformers"
    assert render_model_card("lora", metrics, recipe + "use_lora: true\n").data.library_name == "peft"
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "perplexity": 12.5, "bits_per_byte": 1.25, "exact_match": 40.0, "f1": 55.5
    }
    builtin = render_model_card("default", metrics, "n_layer: 2\n")  # the default corpus: Python's docs
    assert builtin.data.datasets is None and builtin.data.eval_results[0].dataset_name == "builtin:pydoc"


@pytest.mark.slow
def test_upload_plan_lists_exactly_the_model_tokenizer_card_and_logs(pushed_run, tmp_path):
    run = copy_run(pushed_run[0], tmp_path)
    (run / "notes.txt").write_text("not part of a run")
    logs = {p.relative_to(run).as_posix() for p in (run / "runs").rglob("*") if p.is_file()}
    assert logs and (run / "training_args.bin").is_file()
    top = MODEL_AND_TOKENIZER | RUN_FILES | logs
    assert set(upload_plan(str(run))) == set(upload_plan(str(run), HubStrategy.EVERY_SAVE)) == top
    last_checkpoint = {f"last-checkpoint/{f}" for f in CHECKPOINT_FILES}
    assert set(upload_plan(str(run), HubStrategy.CHECKPOINT)) == top | last_checkpoint
    assert set(upload_plan(str(run), HubStrategy.ALL_CHECKPOINTS)) == top | {
        f"checkpoint-{step}/{f}" for step in (2, 4) for f in CHECKPOINT_FILES
    }
    assert all(path == run / name for name, path in upload_plan(str(run), HubStrategy.ALL_CHECKPOINTS).items())
    during_training = checkpoint_plan(run / "checkpoint-2", HubStrategy.CHECKPOINT)
    assert set(during_training) == MODEL_AND_TOKENIZER | {"recipe.yaml"} | last_checkpoint
    assert during_training["model.safetensors"] == run / "checkpoint-2" / "model.safetensors"


@pytest.mark.slow
def test_the_uploaded_files_alone_load_the_same_model_and_tokenizer(pushed_run, tmp_path):
    run = pushed_run[0]
    for name, path in upload_plan(str(run)).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / name)
    text = "Python's documentation"
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == AutoTokenizer.from_pretrained(run)(text).input_ids
    ids = torch.tensor([AutoTokenizer.from_pretrained(run)(text).input_ids])
    with torch.no_grad():
        pushed = AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits
        local = AutoModelForCausalLM.from_pretrained(run).eval()(ids).logits
    assert torch.equal(pushed, local)


@pytest.mark.slow
def test_a_qa_fine_tune_pushes_its_saves_and_the_finished_run_with_its_scores(pushed_run, hub_env, tmp_path):
    """Fine-tuning the pushed pretrained model: each save, then exactly the finished run's plan, card with EM/F1."""
    questions = tmp_path / "nq_open_24.jsonl"
    questions.write_text("".join(NQ_OPEN.read_text(encoding="utf-8").splitlines(keepends=True)[:24]))
    output = tmp_path / "qa"
    with FakeHub() as fake:
        hub_env.setattr(constants, "ENDPOINT", fake.url)
        assert main([
            "finetune-qa", "--model_name_or_path", str(pushed_run[0]), "--train_file", str(questions),
            "--output_dir", str(output), "--max_length", "32", "--generation_max_new_tokens", "4", "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--save_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
            "--push_to_hub", "true", "--hub_model_id", "org/qa", "--hub_strategy", "every_save",
        ]) == 0
    during_training, finished = fake.commits
    assert during_training.keys() == checkpoint_plan(output / "checkpoint-2", HubStrategy.EVERY_SAVE).keys()
    plan = upload_plan(str(output))
    assert finished.keys() == plan.keys() and all(finished[name] == path.read_bytes() for name, path in plan.items())
    metrics = json.loads(finished["metrics.json"])
    card = ModelCard(finished["README.md"].decode())
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        key: metrics[key] for key in ("perplexity", "bits_per_byte", "exact_match", "f1")
    }


@pytest.mark.slow
def test_lmpipe_push_uploads_exactly_the_plan_byte_for_byte(pushed_run, hub_env, tmp_path, capsys):
    run = copy_run(pushed_run[0], tmp_path)
    (run / "README.md").unlink()  # as in a run finished before lmpipe wrote cards: the push writes it
    with FakeHub() as fake:
        hub_env.setattr(constants, "ENDPOINT", fake.url)
        assert main(["push", str(run), "--hub_model_id", "org/tiny", "--private"]) == 0
        assert main(["push", str(run), "--hub_strategy", "checkpoint"]) == 0
    assert fake.created == [
        {"name": "tiny", "organization": "org", "visibility": "private"}, {"name": "run", "organization": "tester"}
    ]
    for uploaded, strategy in zip(fake.commits, (HubStrategy.END, HubStrategy.CHECKPOINT)):
        plan = upload_plan(str(run), strategy)
        assert uploaded.keys() == plan.keys() and "README.md" in plan
        assert all(uploaded[name] == path.read_bytes() for name, path in plan.items())
    assert all(auth == f"Bearer {FAKE_TOKEN}" for _, path, auth in fake.requests if path != "/api/agent-harnesses")
    assert FAKE_TOKEN not in capsys.readouterr().out


@pytest.mark.slow
def test_a_file_holding_the_token_is_never_uploaded(pushed_run, hub_env, tmp_path, capsys):
    run = copy_run(pushed_run[0], tmp_path)
    with (run / "recipe.yaml").open("a") as recipe:
        recipe.write(f"# {FAKE_TOKEN}\n")
    with FakeHub() as fake:
        hub_env.setattr(constants, "ENDPOINT", fake.url)
        assert main(["push", str(run), "--hub_model_id", "org/tiny"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: {run / 'recipe.yaml'}: contains the Hub token; nothing was pushed"
    assert FAKE_TOKEN not in err and fake.created == [] and fake.commits == []


@pytest.mark.slow
def test_lmpipe_push_refuses_a_folder_that_is_not_a_finished_run(pushed_run, tmp_path, capsys):
    run = copy_run(pushed_run[0], tmp_path)
    (run / "metrics.json").unlink()
    assert main(["push", str(run), "--hub_model_id", "org/tiny"]) == 2  # offline too: the folder is checked first
    assert capsys.readouterr().err.strip() == f"error: {run}: not a finished lmpipe run (no metrics.json)"


@pytest.mark.slow
def test_lmpipe_push_refuses_a_run_whose_model_is_not_as_saved(pushed_run, tmp_path, capsys):
    """A truncated final model.safetensors: its files are all there, its manifest says it is not the one saved."""
    run = copy_run(pushed_run[0], tmp_path)
    model = run / "model.safetensors"
    size = model.stat().st_size
    model.write_bytes(model.read_bytes()[: size // 2])
    assert main(["push", str(run), "--hub_model_id", "org/tiny"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {model}: {size // 2} bytes, not the {size} of its manifest (truncated or rewritten); nothing was"
        " pushed: rerun the run's command to finish it again from its last checkpoint"
    )


def silent_port_url(stack) -> str:
    """A port that accepts connections and never answers."""
    listener = stack.enter_context(socket.socket())
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


EARLY_ERRORS = {
    "offline": ("push_to_hub: HF_HUB_OFFLINE is set; unset it to push to the Hub"),
    "no token": ("push_to_hub: no Hub token; set HF_TOKEN or run `hf auth login`"),
    "hub closed": ("push_to_hub: the Hub at {url} is unreachable (ConnectError); check the network or HF_ENDPOINT"),
    "hub silent": ("push_to_hub: the Hub at {url} is unreachable (ReadTimeout); check the network or HF_ENDPOINT"),
    "invalid token": ("push_to_hub: the Hub token is invalid (HF_TOKEN or `hf auth login`)"),
    "read-only token": ("push_to_hub: the Hub token is read-only; use a token with write access"),
    "wrong path": ("push_to_hub: the Hub at {url} answered HTTP 404"),
    "not a hub": ("push_to_hub: {url} does not answer like a Hugging Face Hub (check HF_ENDPOINT)"),
    "hub_revision": ("hub_revision: not supported by lmpipe's push (it pushes to main, one upload at a time)"),
}


@pytest.mark.parametrize("case", EARLY_ERRORS)
def test_push_problems_stop_the_run_before_any_data_is_read(case, hub_env, tmp_path, capsys):
    """The data file does not exist: reporting the Hub problem instead proves it was checked first."""
    flags = ["--hub_revision", "dev"] if case == "hub_revision" else []
    with contextlib.ExitStack() as stack:
        url = constants.ENDPOINT
        if case == "offline":
            hub_env.setattr(constants, "HF_HUB_OFFLINE", True)
        if case == "no token":
            hub_env.delenv("HF_TOKEN")
        if case == "hub closed":
            url = closed_port_url()
        if case == "hub silent":
            url = silent_port_url(stack)
            hub_env.setattr(hub, "HUB_CHECK_TIMEOUT_S", 0.2)
        if case in ("invalid token", "read-only token", "wrong path", "not a hub"):
            account = {"name": "reader", "auth": {"accessToken": {"role": "read"}}} if case != "not a hub" else {}
            fake = stack.enter_context(FakeHub(account, whoami_status=401 if case == "invalid token" else 200))
            url = fake.url + ("/mirror" if case == "wrong path" else "")
        hub_env.setattr(constants, "ENDPOINT", url)
        output = tmp_path / "out"
        code = main(["pretrain", "--train_file", str(tmp_path / "missing.txt"), "--output_dir", str(output),
                     "--push_to_hub", "true", "--report_to", "none", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == "error: " + EARLY_ERRORS[case].format(url=url)
    assert not output.exists() and FAKE_TOKEN not in err
