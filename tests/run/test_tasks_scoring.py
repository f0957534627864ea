"""Scoring of the instruction and retrieval tasks on hand-made texts with known answers, the
chat prompt against transformers' template rendering, and the pass-key prompt builder."""
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ultrametric_jax.run.tasks import TaskError
from ultrametric_jax.run.tasks.chat import (DEFAULT_SYSTEM, chat_prompt, chat_template_from_gguf,
                                            chatml, render_template)
from ultrametric_jax.run.tasks.instructions import (INSTRUCTIONS, EndsWith, ExcludesWord,
                                                    IncludesWord, Instruction, JsonObject,
                                                    NumberedList, WordCount, count_words,
                                                    score_replies, strip_code_fence)
from ultrametric_jax.run.tasks.retrieval import (FILLER, NEEDLE, answer_of, context_lengths,
                                                 is_correct, passkey_prompt, passkey_text)


# ----------------------------------------------------------------------------- instructions

@pytest.mark.parametrize("text, n", [("", 0), ("Tokyo.", 1), ("one,two;three\nfour", 4),
                                     ("It's a well-known fact: 42 cats!", 6), ("— … !", 0)])
def test_count_words(text, n):
    assert count_words(text) == n


@pytest.mark.parametrize("constraint, passing, failing", [
    (WordCount(max_words=9), "The capital of Japan is Tokyo.",
     "The capital city of Japan is, of course, the city of Tokyo."),
    (WordCount(min_words=3), "one two three", "one two"),
    (WordCount(min_words=2, max_words=3), "one two", "one two three four"),
    (IncludesWord("Tokyo"), "It is tokyo.", "It is Kyoto, or Tokyoite."),
    (ExcludesWord("cute"), "A cat is a cuter animal than most.", "Cats are so Cute."),
    (JsonObject(("name", "age")), '{"name": "Ann", "age": 31}',
     '{"name": "Ann"}'),
    (JsonObject(("name",)), '```json\n{"name": "Ann"}\n```', 'Here it is: {"name": "Ann"}'),
    (JsonObject(), "{}", '["not", "an", "object"]'),
    (NumberedList(3), "1. Strength\n2) Mood\n 3. Sleep", "1. Strength\n2. Mood"),
    (NumberedList(2), "Benefits:\n1. a\n2. b\nThat is all.", "1. a\n3. b"),
    (EndsWith("Good night."), "The moon shines. Good night.  \n", "Good night. The moon."),
])
def test_each_constraint_passes_and_fails(constraint, passing, failing):
    assert constraint.check(passing) is True
    assert constraint.check(failing) is False


def test_strip_code_fence():
    assert strip_code_fence("```\n{}\n```") == "{}"
    assert strip_code_fence("  ```json\n[1]```") == "[1]"
    assert strip_code_fence("no fence") == "no fence"


def test_score_replies_counts_prompts_constraints_and_kinds():
    chosen = [Instruction("a", (WordCount(max_words=3), IncludesWord("x"))),
              Instruction("b", (NumberedList(2),)),
              Instruction("c", (IncludesWord("y"), JsonObject()))]
    replies = ["x marks it", "1. a\n2. b", '{"z": "y"}']
    assert score_replies(chosen, replies) == {
        "prompt_accuracy": 1.0, "constraint_accuracy": 1.0, "word_count_accuracy": 1.0,
        "keyword_accuracy": 1.0, "numbered_list_accuracy": 1.0, "json_object_accuracy": 1.0,
        "prompts": 3}
    replies = ["x marks the spot", "1. a\n2. b", "y"]  # word count and JSON fail
    numbers = score_replies(chosen, replies)
    assert numbers["prompt_accuracy"] == pytest.approx(1 / 3)
    assert numbers["constraint_accuracy"] == pytest.approx(3 / 5)
    assert (numbers["word_count_accuracy"], numbers["keyword_accuracy"],
            numbers["json_object_accuracy"]) == (0.0, 1.0, 0.0)


def test_every_instruction_is_satisfiable():
    kinds = {c.kind for ins in INSTRUCTIONS for c in ins.constraints}
    assert {"word_count", "keyword", "json_object", "numbered_list"} <= kinds
    assert all(ins.constraints for ins in INSTRUCTIONS)


# ----------------------------------------------------------------------------- chat

@pytest.fixture(scope="module")
def smollm2_template(smollm2_path):
    template = chat_template_from_gguf(smollm2_path)
    assert template and "<|im_start|>" in template
    return template


def word_tokenizer(vocab_size=96):
    """Words w0..w{vocab_size-1}, anything else w0 (the tiny test models' vocabulary)."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


def hf_tokenizer(template):
    """A transformers tokenizer carrying the template: transformers renders it (the oracle)."""
    return PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), chat_template=template)


def test_chatml_fallback_equals_smollm2_template(smollm2_template):
    tok = hf_tokenizer(smollm2_template)
    for messages in ([{"role": "user", "content": "Name five fruits."}],
                     [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi\nthere"}]):
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert chatml(messages) == expected
        assert render_template(smollm2_template, messages) == expected
    assert DEFAULT_SYSTEM in chatml([{"role": "user", "content": "x"}])


def test_chat_prompt_sources(smollm2_template):
    text = "Name five fruits."
    expected = chatml([{"role": "user", "content": text}])
    assert chat_prompt(object(), text) == expected                        # fallback
    assert chat_prompt(hf_tokenizer(smollm2_template), text) == expected  # tokenizer's own
    other = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>"
    assert chat_prompt(object(), text, other) == "[user] Name five fruits.\n>"


# ----------------------------------------------------------------------------- retrieval

def byte_encode(text):
    return list(text.encode())


@pytest.mark.parametrize("context, depth", [(600, 0.0), (600, 0.5), (1000, 0.3), (1000, 1.0)])
def test_passkey_prompt_fills_the_context_in_closed_form(context, depth):
    key = "48213"
    ids, before = passkey_prompt(byte_encode, key, context, depth)
    fixed = len(passkey_text(key, 0, 0))
    fillers = (context - fixed) // len(FILLER)
    assert len(ids) == fixed + fillers * len(FILLER) <= context < len(ids) + len(FILLER)
    assert before == round(depth * fillers)
    text = bytes(ids).decode()
    assert text == passkey_text(key, before, fillers - before)
    head = text[:text.index(NEEDLE.format(key=key))]
    assert head.count(FILLER) == before and text.count(key) == 2


def test_passkey_prompt_with_a_subword_tokenizer(smollm2_tokenizer):
    from ultrametric_jax.io.tokenizer import decode, encode

    def enc(text):
        return encode(smollm2_tokenizer, text)
    for context, depth in ((384, 0.1), (512, 0.9)):
        ids, before = passkey_prompt(enc, "90517", context, depth)
        assert context - 2 * len(enc(FILLER)) <= len(ids) <= context
        text = decode(smollm2_tokenizer, ids)
        assert text.count("90517") == 2
        assert text[:text.index("The pass key is 90517")].count(FILLER.strip()) == before


def test_passkey_prompt_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"depth must be within \[0, 1\], got 1.5"):
        passkey_prompt(byte_encode, "1", 1000, 1.5)
    with pytest.raises(ValueError, match="a pass-key prompt needs at least .* tokens, more than "
                                         "context_tokens=100"):
        passkey_prompt(byte_encode, "1", 100, 0.5)


@pytest.mark.parametrize("reply, answer, correct", [
    (" 48213. Remember it.", "48213", True),
    ("48213 48213", "48213", True),
    (" 4821", "4821", False),
    ("12345, not 48213", "12345", False),
    ("I do not know.", None, False),
    ("", None, False),
])
def test_passkey_scorer(reply, answer, correct):
    assert answer_of(reply) == answer
    assert is_correct(reply, "48213") is correct


def test_context_lengths_are_capped_by_the_model():
    assert context_lengths((1024, 2048, 4096, 8192), 8192, 12) == [1024, 2048, 4096, 8180]
    assert context_lengths((1024, 2048), 1000, 12) == [988]
    with pytest.raises(TaskError, match=r"retrieval: the model's context \(10\) leaves no room "
                                        r"for a prompt and 12 new tokens"):
        context_lengths((1024,), 10, 12)


def test_passkey_depth_oracle_is_monotone():
    positions = [bytes(passkey_prompt(byte_encode, "31337", 2000, d)[0]).decode().index("31337")
                 for d in np.linspace(0, 1, 6)]
    assert positions == sorted(positions) and positions[0] < 200 and positions[-1] > 1800
