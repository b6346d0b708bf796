"""Generation: settings checks, left-padded batches equal single prompts, stop at EOS, padded vocab never sampled."""

import pytest
import torch

from lmpipe.cli import main
from lmpipe.config.arguments import ModelArguments
from lmpipe.errors import LmpipeError
from lmpipe.generate import GenerationSettings, generate_completions, generation_config
from lmpipe.model.build import build_model
from lmpipe.model.tokenizer import train_bpe_tokenizer

# Prompts of different lengths (so a batch needs padding) and the answers the trained model memorises.
PAIRS = [
    ("Q: red fruit? A:", " apple"),
    ("Q: what is long, yellow and curved? A:", " a ripe banana"),
    ("Q: sky? A:", " blue at noon"),
]
PROMPTS = [prompt for prompt, _ in PAIRS]
TINY = dict(n_layer=1, n_embd=32, n_head=2, n_positions=64)



@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE of 300 ids: the model pads its vocabulary to 320 rows, 20 of which have no token."""
    return train_bpe_tokenizer([prompt + answer for prompt, answer in PAIRS] * 5, vocab_size=300)


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelArguments(**TINY), tokenizer, block_size=64)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny model that has memorised each prompt + answer + EOS, so its greedy answers are known."""
    model = tiny_model(tokenizer)
    rows = [tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id] for prompt, answer in PAIRS]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [tokenizer.eos_token_id] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    model.train()
    for _ in range(80):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2
    return model


def manual_greedy(model, tokenizer, prompt, max_new_tokens):
    """Greedy decoding by hand: full forward each step (no cache, no padding), argmax over real token ids only."""
    ids = tokenizer(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + new])).logits[0, -1, : len(tokenizer)]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0 when sampling, got 0.0"),
        (dict(do_sample=True, temperature=-1.0), "temperature must be > 0 when sampling, got -1.0"),
        (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(do_sample=True, top_k=-1), "top_k must be >= 0"),
        (dict(do_sample=True, greedy=True), "--greedy and --do_sample contradict"),
        (dict(temperature=0.7, top_k=5), "without --do_sample .*: temperature=0.7, top_k=5"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(LmpipeError, match=message):
        GenerationSettings(**settings).check()


def test_good_settings_pass():
    GenerationSettings(greedy=True).check()
    GenerationSettings(do_sample=True, temperature=0.5, top_k=10, top_p=0.9, seed=3).check()


def test_trained_model_answers_and_stops_at_eos(trained, tokenizer):
    answers = generate_completions(trained, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=12), batch_size=3)
    assert answers == [answer for _, answer in PAIRS]
    for prompt, answer in PAIRS:  # the model's next token after each answer is EOS: generation stopped there
        with torch.no_grad():
            logits = trained(torch.tensor([tokenizer(prompt + answer)["input_ids"]])).logits
        assert int(logits[0, -1].argmax()) == tokenizer.eos_token_id
        assert len(tokenizer(answer)["input_ids"]) < 12  # so the stop was EOS, not max_new_tokens
    assert trained.training  # the caller's mode is restored (generation itself ran in eval mode)


def test_batched_greedy_equals_single_prompts_and_manual_greedy(tokenizer):
    model = tiny_model(tokenizer, seed=1).eval()
    assert model.config.use_cache is False  # as training leaves it
    settings = GenerationSettings(max_new_tokens=6)
    widths = []
    hook = model.register_forward_pre_hook(lambda _, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    batched = generate_completions(model, tokenizer, PROMPTS, settings, batch_size=3)
    hook.remove()
    assert widths[1:] == [1] * 5  # the KV cache is on: after the prompt, one new token per forward
    singles = [generate_completions(model, tokenizer, [prompt], settings)[0] for prompt in PROMPTS]
    assert batched == singles
    assert batched == [manual_greedy(model, tokenizer, prompt, 6) for prompt in PROMPTS]
    assert all(batched)  # a random model does not stop at once: the comparison is over real text


def test_padded_vocabulary_rows_are_never_generated(tokenizer):
    """Make an unused embedding row the favourite of every position; only real token ids may come out."""
    model = tiny_model(tokenizer, seed=2).eval()
    unused = model.config.vocab_size - 1
    assert unused >= len(tokenizer)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()  # every final hidden state becomes ln_f.bias
        hidden = model.transformer.ln_f.bias.normal_()
        model.transformer.wte.weight[unused] = 10 * hidden  # tied head: the unused row wins by far
    prompt = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    plain = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert plain[0, -3:].tolist() == [unused] * 3  # what happens without suppression
    favourite = int((model.transformer.wte.weight[: len(tokenizer)] @ hidden).argmax())
    assert favourite != tokenizer.eos_token_id
    greedy = generate_completions(model, tokenizer, PROMPTS[:1], GenerationSettings(max_new_tokens=3))
    assert greedy == [tokenizer.decode([favourite] * 3)]
    sampling = GenerationSettings(max_new_tokens=20, do_sample=True)
    config = generation_config(sampling, tokenizer, model.config.vocab_size)
    sampled = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    assert int(sampled.max()) < len(tokenizer)


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng(tokenizer):
    model = tiny_model(tokenizer, seed=3).eval()
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    state = torch.get_rng_state()
    first = generate_completions(model, tokenizer, PROMPTS, settings, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate_completions(model, tokenizer, PROMPTS, settings, batch_size=2) == first
    other_seed = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, seed=8)
    assert generate_completions(model, tokenizer, PROMPTS, other_seed, batch_size=2) != first
    top_1 = GenerationSettings(max_new_tokens=8, do_sample=True, top_k=1, seed=7)  # sampling among one = greedy
    greedy = GenerationSettings(max_new_tokens=8)
    assert generate_completions(model, tokenizer, PROMPTS, top_1) == generate_completions(
        model, tokenizer, PROMPTS, greedy
    )


def test_prompt_errors_are_named(tokenizer):
    model = tiny_model(tokenizer)
    with pytest.raises(LmpipeError, match="prompt 1: empty"):
        generate_completions(model, tokenizer, ["Q:", ""], GenerationSettings())
    with pytest.raises(LmpipeError, match=r"prompt 0: \d+ tokens \+ max_new_tokens=60 exceed the model's 64 positions"):
        generate_completions(model, tokenizer, [PROMPTS[1]], GenerationSettings(max_new_tokens=60))


def test_generate_command_prints_the_saved_models_answer(trained, tokenizer, tmp_path, capsys):
    trained.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompt, answer = PAIRS[1]
    assert main(["generate", "--model_name_or_path", str(tmp_path), "--prompt", prompt, "--greedy"]) == 0
    assert capsys.readouterr().out == prompt + answer + "\n"


def test_generate_command_refuses_bad_values_before_loading(tmp_path, capsys):
    missing = str(tmp_path / "no-model")
    argv = ["generate", "--model_name_or_path", missing, "--prompt", "Q:", "--do_sample", "--temperature", "0"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "error: temperature must be > 0 when sampling, got 0.0\n"
