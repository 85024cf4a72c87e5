"""The vocabulary shortlist (issue 20, Marian's lexical shortlist): learning its table, storing
it, and searching over a batch's shortlist.

The tiny checkpoint (conftest) carries a table learned from its own synthetic text; its weights
are random, so shortlisted outputs are compared with the full search's, never with text.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from helpers_models import BOS, EOS, PAD, UNK, random_batch, tiny_model
from helpers_training import prepare_tiny, tiny

from nmt import checkpoint, search, shortlist
from nmt.cli import main
from nmt.config import load_config
from nmt.errors import UsageError
from nmt.search import SearchSettings
from nmt.training import Trainer
from nmt.translator import Translator


# ---------------------------------------------------------------------- learning
def _dictionary_corpus(n: int, seed: int = 0):
    """Source ids 4..19 (+ eos 3), each translated by one target id 30 + (id - 4) * 2, in a
    shuffled order with target-only filler ids 60..63 (a language's function words)."""
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        words = rng.sample(range(4, 20), rng.randint(2, 6))
        translation = [30 + (w - 4) * 2 for w in words] + rng.sample(range(60, 64), 2)
        rng.shuffle(translation)
        src.append([*words, EOS])
        tgt.append(translation)
    return src, tgt


def test_ibm1_ranks_each_source_pieces_translation_first():
    src, tgt = _dictionary_corpus(400)
    learned = shortlist.learn(src, tgt, src_vocab=20, tgt_vocab=64)
    table, frequent = learned["table"], learned["frequent"]
    assert table.shape == (20, shortlist.TABLE_WIDTH) and table.dtype == torch.int32
    for w in range(4, 20):
        assert int(table[w, 0]) == 30 + (w - 4) * 2, w
    # eos, in every sentence, stands for IBM-1's NULL word: it explains the filler words
    assert set(table[EOS, :4].tolist()) == {60, 61, 62, 63}
    assert (table[PAD] == -1).all() and (table[w, 40:] == -1).all()  # never seen / no more
    counts = torch.bincount(torch.tensor([i for t in tgt for i in t]), minlength=64)
    assert counts[frequent].tolist() == sorted(counts.tolist(), reverse=True)


def test_select_gives_each_sentence_its_rows_the_frequent_and_the_special_ids():
    table = torch.full((10, 4), -1, dtype=torch.long)
    table[5] = torch.tensor([40, 41, 42, -1])
    table[6] = torch.tensor([42, 43, 44, 45])
    table[7] = torch.tensor([46, 47, 48, 49])  # only at a padded position: never read
    learned = {"table": table, "frequent": torch.tensor([30, 31, 32, 33])}
    src_ids = torch.tensor([[5, 3, 7], [6, 5, 3]])
    space = shortlist.select(learned, src_ids, torch.tensor([2, 3]), 2, 3, (PAD, UNK, BOS, EOS))
    assert space.ids.tolist() == [0, 1, 2, 3, 30, 31, 32, 40, 41, 42, 43]  # the union
    common = [0, 1, 2, 3, 30, 31, 32]
    allowed = [[i for i, ok in zip(space.ids.tolist(), row) if ok] for row in space.allowed]
    assert allowed == [[*common, 40, 41], [*common, 40, 41, 42, 43]]
    settings = space.settings(SearchSettings(bos_id=BOS, eos_id=EOS, pad_id=PAD))
    assert (settings.bos_id, settings.eos_id, settings.pad_id) == (2, 3, 0)
    assert space.tokens([4, 10, 3]) == [30, 43, 3]


# ---------------------------------------------------------------------- the restricted model
def test_a_shortlisted_step_is_the_log_softmax_over_its_rows():
    model = tiny_model("gnmt")
    src_ids, src_lens, tgt_in_ids = random_batch([5, 3], [3, 2], 23)
    ids = torch.tensor([0, 2, 3, 7, 8, 15, 22])
    restricted = model.shortlisted(ids)
    with torch.no_grad():
        enc = model.encode(src_ids, src_lens)
        logits, _, attn = model.decoder.step(tgt_in_ids[:, 1], model.init_state(enc), enc)
        positions = torch.searchsorted(ids, tgt_in_ids[:, 1].clamp(max=22))
        known = ids[positions] == tgt_in_ids[:, 1]
        restricted_enc = restricted.encode(src_ids, src_lens)
        state = restricted.init_state(restricted_enc)
        got, _, got_attn = restricted.step(positions, state, restricted_enc)
    want = torch.log_softmax(logits[:, ids], dim=-1)
    torch.testing.assert_close(got[known], want[known], atol=1e-6, rtol=0)
    assert got.shape == (2, 7)


def test_the_full_list_gives_the_full_search(tiny_checkpoint):
    translator = Translator.from_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")
    every = translator.tokenizer.tgt_vocab_size
    lines = ["the cat sat on the mat", "", "w1 w2 w3", "a dog w7 w8 w9 w10", "w11 mat"]
    for beam in (1, 2):
        want = translator.translate_nbest(lines, beam, beam_size=beam)
        got = translator.translate_nbest(
            lines, beam, beam_size=beam, shortlist=1, shortlist_frequent=every
        )
        assert got == want  # the same texts and the same scores


def test_greedy_over_a_list_holding_its_output_is_the_full_greedy(tiny_checkpoint):
    """The argmax over a subset that holds the full argmax is the same token: greedy search
    over a list that holds every piece the full greedy search produced (and no others but
    the special ids) gives the same text, so the positions are mapped back to the pieces."""
    translator = Translator.from_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")
    lines = ["the cat sat on the mat", "w1 w2 w3", "a dog w7 w8 w9 w10", "w11 mat"]
    want = translator.translate(lines, beam_size=1)
    produced = sorted({i for ids in translator.tokenizer.encode_tgt(want) for i in ids})
    vocab = translator.tokenizer.tgt_vocab_size
    assert 0 < len(produced) < vocab // 2
    translator.shortlist = {  # no table rows: the list is the "frequent" ids and the specials
        "table": torch.full((vocab, 1), -1, dtype=torch.long),
        "frequent": torch.tensor(produced),
    }
    got = translator.translate(lines, beam_size=1, shortlist=1, shortlist_frequent=vocab)
    assert got == want


def test_a_sentences_shortlisted_translation_does_not_depend_on_its_batch(tiny_checkpoint):
    """Each sentence searches over its own list, whatever the union its batch computes."""
    translator = Translator.from_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")
    lines = ["the cat sat on the mat", "w1 w2 w3", "a dog w7 w8 w9 w10", "w11 mat", "w20 w21"]
    settings = {"beam_size": 2, "shortlist": 2, "shortlist_frequent": 5}
    together = translator.translate_nbest(lines, 2, **settings)
    alone = [translator.translate_nbest([line], 2, **settings)[0] for line in lines]
    for hyps, alone_hyps in zip(together, alone):  # same texts; scores to float noise
        assert [t for t, _ in hyps] == [t for t, _ in alone_hyps]
        assert [s for _, s in hyps] == pytest.approx([s for _, s in alone_hyps], abs=1e-4)
    full = translator.translate_nbest(lines, 2, beam_size=2)
    assert together != full  # the lists are short enough to change some translation


def test_a_short_list_keeps_line_alignment_and_its_ids(tiny_checkpoint, tmp_path, capsys):
    lines = ["the cat sat on the mat", "", "w1 w2 w3", "   ", "a dog w7", "w11 mat"]
    src = tmp_path / "in.txt"
    src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out.txt"
    args = ["translate", str(tiny_checkpoint), "-i", str(src), "-o", str(out), "--device", "cpu"]
    assert main([*args, "--shortlist", "2", "--shortlist-frequent", "3"]) == 0
    got = out.read_text(encoding="utf-8").split("\n")
    assert len(got) == len(lines) + 1 and got[1] == got[3] == ""


def test_a_shortlisted_search_produces_only_the_lists_ids():
    model = tiny_model("gnmt")
    src_ids, src_lens, _ = random_batch([6, 4, 5], [2, 2, 2], 23)
    ids = torch.tensor([PAD, UNK, BOS, EOS, 5, 9, 11, 12, 13, 17, 20, 21])
    space = shortlist.SearchSpace(ids)
    settings = space.settings(SearchSettings(bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=3))
    hyps = search.beam_search(model.shortlisted(ids), src_ids, src_lens, settings)
    produced = {t for sent in hyps for h in sent for t in space.tokens(h.tokens)}
    allowed = {UNK, 5, 9, 11, 12, 13, 17, 20, 21}
    assert produced and produced <= allowed
    full = search.beam_search(model, src_ids, src_lens, replace(settings, bos_id=BOS, eos_id=EOS))
    assert {t for sent in full for h in sent for t in h.tokens} - allowed  # it restricts


# ---------------------------------------------------------------------- where tables come from
def test_without_a_table_or_beyond_its_width_is_one_usage_error(tiny_checkpoint, tmp_path):
    ckpt = checkpoint.load(tiny_checkpoint)
    del ckpt["shortlist"]
    bare = tmp_path / "bare.pt"
    checkpoint.atomic_torch_save(ckpt, bare)
    translator = Translator.from_checkpoint(bare, device="cpu", dtype="float32")
    assert translator.translate(["w1 w2"]) != []  # old checkpoints load and translate
    with pytest.raises(UsageError, match="this checkpoint has no shortlist table; add one"):
        translator.translate(["w1 w2"], shortlist=5)
    full = Translator.from_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")
    width = shortlist.TABLE_WIDTH
    with pytest.raises(UsageError, match=f"holds {width} target pieces per source piece"):
        full.translate(["w1 w2"], shortlist=width + 1)


def test_the_shortlist_command_adds_a_table(tiny_checkpoint, tmp_path, capsys):
    ckpt = checkpoint.load(tiny_checkpoint)
    del ckpt["shortlist"]
    bare, out = tmp_path / "bare.pt", tmp_path / "with.pt"
    checkpoint.atomic_torch_save(ckpt, bare)
    src, tgt = tiny_checkpoint.parent / "pairs1.src", tiny_checkpoint.parent / "pairs1.tgt"
    assert main(["shortlist", str(bare), "--src", str(src), "--tgt", str(tgt), "-o", str(out)]) == 0
    assert "shortlist learned from 300 pairs" in capsys.readouterr().out
    added = checkpoint.load(out)["shortlist"]
    original = checkpoint.load(tiny_checkpoint)["shortlist"]
    assert torch.equal(added["table"], original["table"])  # the same text, the same table
    assert torch.equal(added["frequent"], original["frequent"])
    assert len(Translator.from_checkpoint(out, device="cpu").translate(["w1"], shortlist=3)) == 1


def test_the_shortlist_command_refuses_bad_input(tiny_checkpoint, tmp_path, capsys):
    other = prepare_tiny(tmp_path)  # another tokenizer
    data_dir = next(o.split("=", 1)[1] for o in other if o.startswith("data.dir="))
    out = tmp_path / "out.pt"
    capsys.readouterr()
    cases = [
        ([], "give --data-dir DIR, or --src FILE and --tgt FILE"),
        (["--src", "x.txt"], "give --data-dir DIR, or --src FILE and --tgt FILE"),
        (["--data-dir", data_dir], "its tokenizer is not the one of"),
    ]
    for extra, words in cases:
        assert main(["shortlist", str(tiny_checkpoint), *extra, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and not out.exists()


def test_training_writes_the_table_into_its_checkpoints(tmp_path):
    prepared = prepare_tiny(tmp_path)
    out = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny(prepared, out, "train.max_steps=2")))
    trainer.run()
    saved = checkpoint.load(out / "last.pt")["shortlist"]
    src_ids = list(trainer.train_set["src_ids"])
    tgt_ids = list(trainer.train_set["tgt_ids"])
    vocab = trainer.tokenizer.src_vocab_size
    want = shortlist.learn(src_ids, tgt_ids, vocab, trainer.tokenizer.tgt_vocab_size)
    assert torch.equal(saved["table"], want["table"])
    averaged = checkpoint.average([out / "last.pt", out / "last.pt"])
    assert torch.equal(averaged["shortlist"]["table"], want["table"])  # kept by averaging
