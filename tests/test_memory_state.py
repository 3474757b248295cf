"""Memory states (rmt_fast/memory_state.py, engine/reading.py): read once, ask many, against the oracle."""
import copy
import json
import struct

import pytest
import torch
from helpers import oracle, random_docs, tiny_model
from oracle import oracle_logits

from rmt_fast import Engine, InvalidDocumentsError, MemoryState, MemoryStateError

M_TOKENS, INPUT = 3, 24
S = INPUT - M_TOKENS - 3                      # 18 text ids per segment
DOC_LENGTHS = [1, S - 1, S, S + 1, 2 * S - 1, 2 * S, 5 * S + 3]
QUESTION_LENGTHS = [1, S - 1, S, S + 1]


def model_of(alignment="left", **kw):
    return tiny_model(num_mem_tokens=M_TOKENS, input_size=INPUT, segment_alignment=alignment, **kw)


def oracle_memory(model, ids, alignment="left"):
    """The oracle's memory [M, H] after reading ``ids`` (whole segments), float64."""
    cfg = model.config
    with torch.no_grad():
        _, mem = oracle_logits(model.model, ids, vocab_size=cfg.vocab_size, num_mem_tokens=cfg.num_mem_tokens,
                               input_size=cfg.input_size, cls_id=cfg.cls_token_id, sep_id=cfg.sep_token_id,
                               pad_id=cfg.pad_token_id, alignment=alignment, return_memory=True)
    return mem.double()


@pytest.fixture(scope="module")
def left():
    torch.manual_seed(1234)
    return model_of("left")


@pytest.mark.parametrize("doc_len", DOC_LENGTHS)
def test_ask_equals_classify_of_document_plus_question(left, doc_len):
    """Left alignment: ask(read(doc), q) == classify([doc + q]) exactly, and the oracle's logits; a
    batch of mixed-length questions, fewer slots than questions, each slot from the stored memory."""
    engine = Engine(left)
    vocab = left.config.vocab_size
    doc = random_docs([doc_len], vocab, low=3)[0]
    questions = random_docs(QUESTION_LENGTHS, vocab, low=3)
    state = engine.read(doc)
    assert state.n_segments == doc_len // S and state.n_tokens == doc_len
    assert torch.equal(state.tail, doc[doc_len // S * S:])
    got = engine.ask(state, questions, batch_size=3)
    whole = engine.classify([torch.cat([doc, q]) for q in questions], batch_size=3)
    assert (got - whole).abs().max() <= 1e-5
    for i, q in enumerate(questions):
        ref = oracle(left, torch.cat([doc, q]), alignment="left")
        assert (got[i].double() - ref).abs().max() <= 1e-4, f"question {i} (length {len(q)})"


def test_read_keeps_the_oracle_memory_and_the_tail(left):
    engine = Engine(left)
    doc = random_docs([3 * S + 5], left.config.vocab_size, low=3)[0]
    state = engine.read(doc)
    assert (state.memory.double() - oracle_memory(left, doc[:3 * S])).abs().max() <= 1e-4
    assert state.memory.dtype == torch.float32 and tuple(state.memory.shape) == (M_TOKENS, 32)
    assert torch.equal(state.tail, doc[3 * S:]) and state.n_segments == 3


def test_reading_in_uneven_pieces_equals_reading_whole(left):
    engine = Engine(left)
    doc = random_docs([5 * S + 3], left.config.vocab_size, low=3)[0]
    whole = engine.read(doc)
    state = None
    for a, b in [(0, 1), (1, S + 2), (S + 2, S + 2), (S + 2, 3 * S + 1), (3 * S + 1, 5 * S + 3)]:
        state = engine.read(doc[a:b], state=state)
    assert torch.equal(state.memory, whole.memory) and torch.equal(state.tail, whole.tail)
    assert (state.n_tokens, state.n_segments) == (whole.n_tokens, whole.n_segments) == (5 * S + 3, 5)
    q = random_docs([S + 1], left.config.vocab_size, low=3)
    assert torch.equal(engine.ask(state, q), engine.ask(whole, q))


def test_read_many_equals_read_each(left):
    engine = Engine(left)
    docs = random_docs([S - 1, 4 * S, 2 * S + 7, 1, 3 * S], left.config.vocab_size, low=3)
    states = engine.read_many(docs, batch_size=2)
    for doc, got in zip(docs, states):
        one = engine.read(doc)
        assert (got.memory - one.memory).abs().max() <= 1e-5 and torch.equal(got.tail, one.tail)
        assert (got.n_tokens, got.n_segments) == (one.n_tokens, one.n_segments)


def test_right_alignment_reads_full_segments_then_places_tail_and_question_right():
    """The documented rule for right/center models: full left-aligned segments, then the tail +
    question cut by the model's own alignment, from the stored memory."""
    model = model_of("right")
    engine = Engine(model)
    doc, q = random_docs([2 * S + 5, S + 4], model.config.vocab_size, low=3)
    got = engine.ask(engine.read(doc), [q])[0].double()
    memory = oracle_memory(model, doc[:2 * S], alignment="right").float()
    ref = oracle(model, torch.cat([doc[2 * S:], q]), alignment="right", start_memory=memory)
    assert (got - ref).abs().max() <= 1e-4
    q = q[:S - 5]                                              # len(doc + q) = 3S: every cut is the same
    assert (engine.ask(engine.read(doc), [q]) - engine.classify([torch.cat([doc, q])])).abs().max() <= 1e-5


def test_save_load_round_trip_is_bit_exact(left, tmp_path):
    engine = Engine(left)
    doc = random_docs([2 * S + 9], left.config.vocab_size, low=3)[0]
    state = engine.read(doc)
    state.save(tmp_path / "a.rmtstate")
    back = MemoryState.load(tmp_path / "a.rmtstate")
    assert torch.equal(back.memory, state.memory) and torch.equal(back.tail, state.tail)
    assert (back.n_tokens, back.n_segments, back.fingerprint, back.config, back.dtype) == \
        (state.n_tokens, state.n_segments, state.fingerprint, state.config, state.dtype)
    q = random_docs([5, S], left.config.vocab_size, low=3)
    assert torch.equal(engine.ask(back, q), engine.ask(state, q))
    assert not list(tmp_path.glob(".*tmp*"))                      # the atomic write left no temporary


def test_a_state_of_another_model_is_refused(left):
    state = Engine(left).read(random_docs([S + 2], left.config.vocab_size, low=3)[0])
    other = copy.deepcopy(left)
    with torch.no_grad():
        other.model.classifier.weight[0, 0] += 1e-3               # the same config, one weight changed
    with pytest.raises(MemoryStateError, match="another model"):
        Engine(other).ask(state, [[5, 6]])
    with pytest.raises(MemoryStateError, match="alignment"):
        Engine(model_of("right")).ask(state, [[5, 6]])
    with pytest.raises(MemoryStateError, match="memory size"):
        other_size = tiny_model(num_mem_tokens=M_TOKENS + 1, input_size=INPUT, segment_alignment="left")
        Engine(other_size).read([5], state=state)
    with pytest.raises(MemoryStateError, match="computed in float32"):
        Engine(left, dtype=torch.bfloat16).ask(state, [[5, 6]])


def test_damaged_files_are_refused_naming_the_file(left, tmp_path):
    state = Engine(left).read(random_docs([S + 2], left.config.vocab_size, low=3)[0])
    path = tmp_path / "s.rmtstate"
    state.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.rmtstate").write_bytes(data[:len(data) - 7])
    with pytest.raises(MemoryStateError, match="cut.rmtstate.*truncated or corrupt"):
        MemoryState.load(tmp_path / "cut.rmtstate")
    flipped = bytearray(data)
    flipped[-20] ^= 0x40                                          # a bit of the tensors' bytes
    (tmp_path / "flip.rmtstate").write_bytes(bytes(flipped))
    with pytest.raises(MemoryStateError, match="flip.rmtstate.*checksum"):
        MemoryState.load(tmp_path / "flip.rmtstate")
    with pytest.raises(MemoryStateError, match="missing.rmtstate"):
        MemoryState.load(tmp_path / "missing.rmtstate")


def test_a_file_with_a_wrong_shape_is_refused(left, tmp_path):
    state = Engine(left).read(random_docs([S + 2], left.config.vocab_size, low=3)[0])
    state.memory = torch.randn(M_TOKENS + 1, 32)               # a well-formed file of the wrong shape
    state.save(tmp_path / "shape.rmtstate")
    with pytest.raises(MemoryStateError, match="shape.rmtstate.*num_mem_tokens=3"):
        MemoryState.load(tmp_path / "shape.rmtstate")
    state.memory = torch.randn(M_TOKENS, 31)
    state.save(tmp_path / "wide.rmtstate")
    loaded = MemoryState.load(tmp_path / "wide.rmtstate")      # the file alone cannot know the hidden size
    with pytest.raises(MemoryStateError, match="do not fit this model"):
        Engine(left).ask(loaded, [[5]])
    header_len = struct.unpack("<Q", (tmp_path / "wide.rmtstate").read_bytes()[:8])[0]
    assert header_len > 0 and json.loads((tmp_path / "wide.rmtstate").read_bytes()[8:8 + header_len])


def test_an_empty_tail_and_question_is_an_error(left):
    engine = Engine(left)
    state = engine.read(random_docs([S], left.config.vocab_size, low=3)[0])
    with pytest.raises(InvalidDocumentsError, match="1"):
        engine.ask(state, [[5], [left.config.sep_token_id]])


def test_bf16_ask_equals_classify_within_tolerance(left):
    engine = Engine(left, dtype=torch.bfloat16)
    vocab = left.config.vocab_size
    doc = random_docs([4 * S + 3], vocab, low=3)[0]
    questions = random_docs(QUESTION_LENGTHS, vocab, low=3)
    got = engine.ask(engine.read(doc), questions, batch_size=2)
    whole = engine.classify([torch.cat([doc, q]) for q in questions], batch_size=2)
    ref = Engine(left).classify([torch.cat([doc, q]) for q in questions])
    assert (got - whole).abs().max() <= 0.05                   # the Engine's bf16 tolerance (test_engine.py)
    assert (got - ref).abs().max() <= 0.05


def test_each_document_goes_on_from_its_own_state(left):
    """The loop's per-document start memory: documents going on from different states, batched, fewer
    slots than documents, longest first (so document and slot numbers differ)."""
    from rmt_fast.engine import reading
    engine = Engine(left)
    vocab = left.config.vocab_size
    firsts = random_docs([S + 3, 2 * S, 3 * S - 1, S - 2], vocab, low=3)
    seconds = random_docs([S, 4 * S + 1, 2 * S + 2, 3 * S], vocab, low=3)
    states = engine.read_many(firsts, batch_size=2)
    with torch.inference_mode():
        got = reading.read_many(engine, seconds, None, 3, states)
    for a, b, st in zip(firsts, seconds, got):
        one = engine.read(torch.cat([a, b]))
        assert (st.memory - one.memory).abs().max() <= 1e-5 and torch.equal(st.tail, one.tail)
