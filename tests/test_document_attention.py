"""Document attention: inside a packed block each document is computed as if it ran alone."""

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from lmpipe.cli import main
from lmpipe.data.collate import DocumentBlocks, collate_blocks, document_position_ids
from lmpipe.data.packing import blocks_as_array, pack_blocks, tokenize_documents

from conftest import tiny_run, write_pydoc_corpus

DOCUMENTS = ["Hello world, a first document.", "A second one", "x", "", "The last document of the corpus here."]


def documents(row: list[int], eos: int) -> list[tuple[int, int]]:
    """(start, end) of each document piece of a block, cut after every EOS, found without the collator."""
    pieces, start = [], 0
    for index, token in enumerate(row):
        if token == eos:
            pieces.append((start, index + 1))
            start = index + 1
    return pieces + ([(start, len(row))] if start < len(row) else [])


def tiny_gpt2(vocab_size: int, attn_implementation: str) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2, use_cache=False,
                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    config._attn_implementation = attn_implementation
    return GPT2LMHeadModel(config).eval()


def alone(model, row: torch.Tensor, pieces: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([model(row[start:end][None]).logits[0] for start, end in pieces])


def test_positions_restart_after_every_eos():
    ids = torch.tensor([[5, 6, 0, 7, 0, 0, 8, 9], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert document_position_ids(ids, eos_token_id=0).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_each_document_of_a_block_has_the_logits_it_has_alone(gpt2_tokenizer, attn_implementation):
    """A block starting mid-document, an empty document (a lone EOS) and a cut last one. Plain blocks differ, and so
    does the same batch with an attention mask (even all ones) or a KV cache: with either, transformers skips the
    per-document mask, which is why the collator adds none and training keeps the cache off."""
    eos = gpt2_tokenizer.eos_token_id
    tokenized = tokenize_documents(Dataset.from_dict({"text": DOCUMENTS}), gpt2_tokenizer, "text")
    blocks = blocks_as_array(pack_blocks(tokenized, block_size=10))
    assert blocks[1][0] != eos and blocks[1][-1] != eos  # the second block starts and ends inside a document
    features = [{"input_ids": block} for block in blocks]
    batch = DocumentBlocks(eos)(features)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask, labels untouched
    assert batch["labels"].tolist() == batch["input_ids"].tolist()
    model = tiny_gpt2(len(gpt2_tokenizer), attn_implementation)
    with torch.no_grad():
        packed = model(**batch).logits
        undone = [model(**collate_blocks(features)).logits, model(**batch, use_cache=True).logits,
                  model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).logits]
        for index, row in enumerate(batch["input_ids"]):
            expected = alone(model, row, documents(row.tolist(), eos))
            assert torch.allclose(packed[index], expected, atol=1e-5)
            for logits in undone:
                assert not torch.allclose(logits[index], expected, atol=1e-3)


@pytest.mark.parametrize("streaming", [False, True])
def test_the_trainers_batches_keep_documents_apart(tmp_path, streaming):
    """Through `lmpipe pretrain`'s own Trainer, in memory and streamed: its train and eval batches carry restarting
    positions and no mask, its model no cache, and each document's logits equal the document alone."""
    from lmpipe.config.recipe import parse_recipe
    from lmpipe.pretrain import build_pretrain_trainer

    corpus = write_pydoc_corpus(tmp_path / "corpus.txt", 8)
    stream = ["--streaming", "true", "--streaming_validation_documents", "50"] if streaming else []
    flags = ["--train_file", str(corpus), "--document_attention", "true", "--sample_by", "line", *stream,
             *tiny_run(n_embd=16, output_dir=tmp_path / "out", max_steps=2)]
    recipe = parse_recipe(flags)
    trainer = build_pretrain_trainer(recipe, recipe.training)[0]
    model, eos = trainer.model.eval(), trainer.processing_class.eos_token_id
    assert model.config.use_cache is False
    for loader in (trainer.get_train_dataloader(), trainer.get_eval_dataloader()):
        batch = next(iter(loader))
        assert "attention_mask" not in batch
        assert (batch["position_ids"] == 0).sum() > len(batch["input_ids"])  # some block holds two documents
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            for row, row_logits in zip(batch["input_ids"], logits):
                assert torch.allclose(row_logits, alone(model, row, documents(row.tolist(), eos)), atol=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--use_cache", "true"], "document_attention: true needs use_cache: false"),
        (["--attn_implementation", "flash_attention_2"], "needs attn_implementation sdpa or eager, got flash_"),
    ],
)
def test_what_would_undo_it_is_refused(tmp_path, capsys, flags, message):
    """A KV cache, or flash-attention, which finds documents from position ids only in a batch of one row."""
    flags = ["--document_attention", "true", *flags, *tiny_run(output_dir=tmp_path / "out")]
    assert main(["pretrain", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
