"""The behaviour-task registry and the fidelity numbers: hand-made continuations, a tiny model
whose "surgical" twin differs at a known token, and a perturbed surgical model, each against a
float64 numpy oracle; then a tiny end-to-end run_tasks writing the JSON and the PNG."""
import contextlib
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jit_forward
from test_tasks_scoring import word_tokenizer
from ultrametric_jax.model import llama
from ultrametric_jax.model.config import LlamaConfig
from ultrametric_jax.model.llama import LlamaForCausalLM
from ultrametric_jax.run.tasks import (TASKS, Task, TaskError, fidelity, parse_task_names,
                                      register_task, run_tasks)
from ultrametric_jax.run import generate as generate_module
from ultrametric_jax.run.tasks.decoding import (Contestant, contestants, fill_cache_bucket,
                                              greedy)
from ultrametric_jax.run.tasks.fidelity import first_divergence, fidelity_numbers, routed_share
from ultrametric_jax.run.tasks.registry import TaskContext, end_token_ids
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.inject import inject_topology, surgical_layers

pytestmark = pytest.mark.usefixtures("highest_precision")
SURGERY = SurgeryConfig(arity=2, levels=3, d_max=1, window=2, sink_tokens=1)


def tiny_model(seed=0, qk_gain=6.0):
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=512, eos_token_id=None)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))
    for layer in model.model.layers:  # sharper attention than the 0.02 init gives
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.kernel[...] = proj.kernel[...] * qk_gain
    return model


def surgical_twin(seed=0, router_seed=None):
    """The tiny model with a topology: collapsed (equal to the base), or perturbed routers."""
    model = inject_topology(tiny_model(seed), SURGERY, nnx.Rngs(0))
    if router_seed is not None:
        rng = np.random.default_rng(router_seed)
        for attn in surgical_layers(model):
            fc2 = attn.router.fc2
            fc2.kernel[...] = jnp.asarray(rng.normal(size=fc2.kernel.shape), jnp.float32)
            fc2.bias[...] = jnp.zeros(fc2.bias.shape, jnp.float32)
    return model


class BoostedAt(nnx.Module):
    """The base model with `bias` added to the logit of `token` at absolute `position` only."""

    def __init__(self, base, position: int, token: int, bias: float):
        self.base, self.config = base, base.config
        self.position, self.token, self.bias = position, token, bias

    def init_cache(self, *args, **kwargs):
        return self.base.init_cache(*args, **kwargs)

    def __call__(self, input_ids, *, positions=None, attention_mask=None, cache=None):
        pos = llama.default_positions(input_ids, cache) if positions is None else positions
        out = self.base(input_ids, positions=positions, attention_mask=attention_mask,
                        cache=cache)
        logits, new_cache = out if cache is not None else (out, None)
        hit = (pos == self.position)[..., None] & (jnp.arange(logits.shape[-1]) == self.token)
        logits = logits + self.bias * hit
        return logits if cache is None else (logits, new_cache)


def context(dense, surgical, *, fast=False, eos=frozenset()):
    return TaskContext(dense, surgical, word_tokenizer(), fast, batch_size=4, eos_ids=eos,
                       max_context=512, progress=False)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_kl(p_logits, q_logits):
    lp, lq = np_log_softmax(p_logits), np_log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


WIDTH = 32


def padded_logits(forward, seq):
    """Logits [len(seq), V] of one sequence, right-padded to WIDTH (one compile; causal
    attention makes the padding irrelevant to the real positions)."""
    return forward(np.asarray([list(seq) + [0] * (WIDTH - len(seq))]))[0, :len(seq)]


def naive_greedy(forward, prompt, steps):
    """Greedy tokens by recomputing the whole sequence at every step (no cache)."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(np.argmax(padded_logits(forward, seq)[-1])))
    return seq[len(prompt):]


# ----------------------------------------------------------------------------- hand-made

def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2          # stopped early
    assert first_divergence([1, 2], [1, 2, 3, 4]) == 2       # went on past the dense EOS
    assert first_divergence([5], [6]) == 0


def test_fidelity_numbers_of_hand_made_continuations():
    reference = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    candidate = [[1, 2, 0, 4], [5, 6], [0]]
    kl = [np.array([0.0, 0.0, 0.5, 0.1]), np.zeros(2), np.array([0.3, 0.2, 0, 0, 0, 0.4])]
    assert fidelity_numbers(reference, candidate, kl) == pytest.approx(
        {"greedy_agreement": (2 + 2 + 0) / 12, "mean_first_divergence": 4 / 3,
         "identical_share": 1 / 3, "kl_per_token": 1.5 / 12, "prompts": 3, "tokens": 12})
    with pytest.raises(ValueError, match="at least one non-empty reference continuation"):
        fidelity_numbers([[1], []], [[1], []], [np.zeros(1), np.zeros(0)])
    with pytest.raises(ValueError, match="as many candidate continuations and KL rows as "
                                         "references, got 1 and 2 for 2"):
        fidelity_numbers([[1], [2]], [[1]], [np.zeros(1)] * 2)


def test_routed_share_against_the_mask():
    """The closed form against the mask itself: a query counts when, with cluster ids that
    never agree, some causal key is disallowed."""
    from pallas_kernels.masking import allowed_pairs
    prompts, conts = [3, 10, 1, 6], [4, 2, 9, 5]
    for window, sink in ((4, 1), (2, 0), (16, 3)):
        routed = total = 0
        for n, m in zip(prompts, conts):
            for i in range(n - 1, n - 1 + m):
                keys = np.arange(i + 1)
                ok = np.asarray(allowed_pairs(np.int32(i), keys, np.int32(0), np.ones_like(keys),
                                              window=window, sink_tokens=sink))
                routed += int(not ok.all())
                total += 1
        assert routed_share(prompts, conts, window, sink) == pytest.approx(routed / total)
    assert routed_share([3, 10], [4, 2], 4, 1) == pytest.approx(3 / 6)
    numbers = fidelity_numbers([[1, 2]], [[1, 3]], [np.zeros(2)])
    caveat = "reach past the window and sink"
    assert caveat in fidelity.summary({"surgical": numbers, "routed_share": 0.0})
    assert caveat not in fidelity.summary({"surgical": numbers, "routed_share": 0.9})


# ----------------------------------------------------------------------------- tiny models

@pytest.mark.slow
def test_fidelity_against_numpy_with_a_known_diverging_token(monkeypatch):
    dense_model = tiny_model(seed=1)
    prompts = [[5, 17, 3, 88, 41], [7, 1, 60, 22, 13, 4, 9, 30, 2], [11] * 7]
    steps, position = 12, 10
    forward = jit_forward(dense_model)
    dense_tokens = [naive_greedy(forward, p, steps) for p in prompts]
    diverge_at = [position - len(p) + 1 for p in prompts]                 # 6, 2, 4
    token = next(t for t in range(96)
                 if all(row[k] != t for row, k in zip(dense_tokens, diverge_at)))
    surgical_model = BoostedAt(dense_model, position, token, bias=30.0)
    dense = Contestant("dense", dense_model, contextlib.nullcontext)
    surgical = Contestant("surgical", surgical_model, contextlib.nullcontext)
    monkeypatch.setattr(fidelity, "PROMPTS", ["w" + " w".join(map(str, p)) for p in prompts])
    monkeypatch.setattr(fidelity, "MAX_NEW_TOKENS", steps)
    result = fidelity.run(context(dense, surgical))

    kl = 0.0
    for p, row in zip(prompts, dense_tokens):
        logits = padded_logits(forward, p + row[:-1])[position]          # the one changed row
        boosted = logits.astype(np.float64) + 30.0 * (np.arange(96) == token)
        kl += np_kl(logits, boosted)
    s = result["surgical"]
    assert s["greedy_agreement"] == pytest.approx(sum(diverge_at) / (3 * steps), abs=1e-12)
    assert s["mean_first_divergence"] == pytest.approx(np.mean(diverge_at), abs=1e-12)
    assert (s["identical_share"], s["prompts"], s["tokens"]) == (0.0, 3, 3 * steps)
    assert kl > 1.0
    assert s["kl_per_token"] == pytest.approx(kl / (3 * steps), rel=1e-4)
    assert result["dense"] == {"greedy_agreement": 1.0, "mean_first_divergence": steps,
                               "identical_share": 1.0, "kl_per_token": 0.0, "prompts": 3,
                               "tokens": 3 * steps}


@pytest.mark.slow
def test_fidelity_of_a_perturbed_surgical_model_against_numpy(monkeypatch):
    steps = 10
    prompts = [[4, 8, 15, 16, 23, 42], [1, 2, 3], [77, 3, 9, 50, 61]]
    dense_model, surgical_model = tiny_model(seed=2), surgical_twin(seed=2, router_seed=5)
    fd, fs = jit_forward(dense_model), jit_forward(surgical_model)
    dense_tokens = [naive_greedy(fd, p, steps) for p in prompts]
    surgical_tokens = [naive_greedy(fs, p, steps) for p in prompts]
    div = [first_divergence(d, s) for d, s in zip(dense_tokens, surgical_tokens)]
    kl = sum(np_kl(padded_logits(fd, p + d[:-1])[len(p) - 1:],
                   padded_logits(fs, p + d[:-1])[len(p) - 1:]).sum()
             for p, d in zip(prompts, dense_tokens))
    assert 0 < sum(div) < 3 * steps  # the routers change some continuations, not all at once
    monkeypatch.setattr(fidelity, "PROMPTS", ["w" + " w".join(map(str, p)) for p in prompts])
    monkeypatch.setattr(fidelity, "MAX_NEW_TOKENS", steps)
    result = fidelity.run(context(*contestants(dense_model, surgical_model)))
    s = result["surgical"]
    assert s["greedy_agreement"] == pytest.approx(sum(div) / (3 * steps), abs=1e-12)
    assert s["mean_first_divergence"] == pytest.approx(np.mean(div), abs=1e-12)
    assert s["kl_per_token"] == pytest.approx(kl / (3 * steps), rel=1e-3)
    # One copy of the weights for both sides: the dense side runs the base attention.
    shared = fidelity.run(context(*contestants(surgical_model, surgical_model)))
    assert shared["surgical"] == pytest.approx(s, rel=1e-5)


def test_collapsed_surgical_model_is_faithful(monkeypatch):
    monkeypatch.setattr(fidelity, "PROMPTS", fidelity.PROMPTS[:4])
    monkeypatch.setattr(fidelity, "MAX_NEW_TOKENS", 8)
    result = fidelity.run(context(*contestants(tiny_model(), surgical_twin())))
    s = result["surgical"]
    assert (s["greedy_agreement"], s["identical_share"], s["mean_first_divergence"]) == (1, 1, 8)
    assert abs(s["kl_per_token"]) < 1e-6


# ----------------------------------------------------------------------------- registry

def test_greedy_batches_share_one_compile(monkeypatch, caplog):
    """Batches of different prompt widths and a short last batch decode through one compiled
    prefill and one decode loop, and every row equals decoding its prompt alone."""
    import logging

    import jax
    model = tiny_model(seed=4)
    dense, _ = contestants(model, surgical_twin())
    prompts = [[5, 6, 7], list(range(1, 41)), [9] * 70, [3, 1, 4, 1, 5], list(range(60, 95))]
    monkeypatch.setattr(generate_module, "_COMPILED", {})   # fresh jits: nothing compiled yet
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        got = greedy(dense, prompts, 6, eos_ids=frozenset(), batch_size=2)
    compiles = [sum(f"Compiling jit({name})" in r.getMessage() for r in caplog.records)
                for name in ("prefill", "decode")]
    assert compiles == [1, 1]
    for prompt, tokens in zip(prompts, got):
        assert tokens == generate_module.generate(model, [prompt], 6)[0].tolist()


def test_fast_decoding_fills_one_cache_length_and_is_shared():
    assert fill_cache_bucket([[1] * 40, [2] * 5], 12, 256) == 256 - 64
    assert fill_cache_bucket([[1] * 224], 12, 256) == 32
    assert fill_cache_bucket([[1] * 250], 12, 256) == 12      # does not fit: as asked
    ctx = context(*contestants(tiny_model(), surgical_twin()), fast=True)
    calls = []
    ctx.greedy(ctx.dense, [[3, 4, 5]], 8, tick=calls.append)
    first = dict(ctx._decoded)
    again = ctx.greedy(ctx.dense, [[3, 4, 5]], 8, tick=calls.append)
    assert list(first) == [("dense", ((3, 4, 5),), 256 - 32)] and ctx._decoded == first
    assert again == first[("dense", ((3, 4, 5),), 224)] and len(again[0]) == 224
    assert calls == [1, 1]


def test_task_names():
    assert list(TASKS)[:4] == ["fidelity", "humaneval", "instructions", "retrieval"]
    assert parse_task_names("all") == list(TASKS)
    assert parse_task_names(" retrieval, fidelity,retrieval ") == ["retrieval", "fidelity"]
    with pytest.raises(TaskError, match="unknown task 'mmlu'; choose from fidelity, humaneval, "
                                        "instructions, retrieval"):
        parse_task_names("fidelity,mmlu")
    with pytest.raises(TaskError, match="no task named; choose from"):
        parse_task_names(" , ")


def test_registered_task_runs_with_differences_and_duplicates_are_refused(monkeypatch):
    def run(ctx):
        assert ctx.dense.name == "dense" and ctx.surgical.name == "surgical"
        return {"dense": {"score": 0.75, "n": 4}, "surgical": {"score": 0.5, "n": 4},
                "note": "x"}
    task = Task("toy", "a toy", run, lambda r: f"toy {r['surgical']['score']}", ("score",))
    monkeypatch.setitem(TASKS, "toy", task)
    with pytest.raises(ValueError, match="a task named 'toy' is already registered"):
        register_task(task)
    report = run_tasks("toy", tiny_model(), surgical_twin(), word_tokenizer(), progress=False)
    assert report["tasks"]["toy"]["difference"] == {"score": -0.25, "n": 0}
    assert report["summary"] == {"toy": "toy 0.5"} and report["fast"] is True


def test_a_run_stopped_by_a_later_task_keeps_the_finished_tasks(monkeypatch, tmp_path):
    """tasks.json is written after every task: when the second task fails, the file holds the
    first task's numbers and names the second as pending."""
    def good(ctx):
        return {"dense": {"score": 0.75}, "surgical": {"score": 0.5}}

    def crash(ctx):
        raise RuntimeError("interrupted")
    monkeypatch.setitem(TASKS, "first", Task("first", "", good, lambda r: "first", ("score",)))
    monkeypatch.setitem(TASKS, "second", Task("second", "", crash, lambda r: "", ("score",)))
    with pytest.raises(RuntimeError, match="interrupted"):
        run_tasks("first,second", tiny_model(), surgical_twin(), word_tokenizer(),
                  progress=False, out_dir=str(tmp_path))
    saved = json.loads((tmp_path / "tasks.json").read_text())
    assert saved["pending"] == ["second"] and list(saved["tasks"]) == ["first"]
    assert saved["tasks"]["first"]["difference"] == {"score": -0.25}
    assert (tmp_path / "tasks.png").stat().st_size > 0
    assert not (tmp_path / "tasks.json.tmp").exists()


def test_run_tasks_rejects_bad_models_and_arguments():
    with pytest.raises(ValueError, match="the surgical model carries no ultrametric topology"):
        run_tasks("fidelity", tiny_model(), tiny_model(), word_tokenizer())
    with pytest.raises(TaskError, match="batch_size must be >= 1, got 0"):
        run_tasks("fidelity", tiny_model(), surgical_twin(), word_tokenizer(), batch_size=0)


def test_humaneval_refuses_prompts_longer_than_the_model():
    ctx = context(*contestants(tiny_model(), surgical_twin()), fast=True)
    ctx.max_context = 64
    with pytest.raises(TaskError, match=r"humaneval: a prompt and its 96 new tokens need \d+ "
                                        r"positions, more than the model's 64"):
        TASKS["humaneval"].run(ctx)


def test_retrieval_refuses_a_context_too_short_for_the_prompt():
    ctx = context(*contestants(tiny_model(), surgical_twin()), fast=True)
    ctx.max_context = 40
    with pytest.raises(TaskError, match=r"retrieval: a pass-key prompt needs at least \d+ "
                                        r"tokens, more than context_tokens=28"):
        TASKS["retrieval"].run(ctx)


def test_end_tokens_and_chat_format_of_the_vocabulary():
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({"a": 0, "<|im_start|>": 6, "<|im_end|>": 7,
                                      "<|endoftext|>": 3}, unk_token="a"))
    assert end_token_ids(surgical_twin(), tok) == frozenset({3, 7})
    assert end_token_ids(tiny_model(), word_tokenizer()) == frozenset()
    ctx = context(None, None)
    assert not ctx.knows_chat
    assert dataclasses.replace(ctx, tokenizer=tok).knows_chat
    assert dataclasses.replace(ctx, chat_template="{{ messages }}").knows_chat


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_run_tasks_end_to_end_writes_json_and_png(tmp_path):
    import matplotlib.image
    report = run_tasks("all", tiny_model(), surgical_twin(), word_tokenizer(), fast=True,
                       progress=True, out_dir=str(tmp_path))
    json_path, png_path = report["files"]
    assert (json_path, png_path) == (str(tmp_path / "tasks.json"), str(tmp_path / "tasks.png"))
    with open(json_path) as f:
        saved = json.load(f)
    assert saved["summary"] == report["summary"] and saved["fast"] is True
    assert list(saved["tasks"]) == ["fidelity", "humaneval", "instructions", "retrieval",
                                    "fidelity_long"]
    for name, line in report["summary"].items():
        assert line.startswith(name + ": ") and "\n" not in line
    image = matplotlib.image.imread(png_path)
    assert image.ndim == 3 and image.shape[1] > 3 * image.shape[0]  # five panels side by side
    # Collapsed routers compute the base model: both sides score the same on every task.
    for name, result in saved["tasks"].items():
        assert result["dense"] == result["surgical"], name
        assert set(result["difference"].values()) == {0}, name
    fid = saved["tasks"]["fidelity"]["surgical"]
    assert (fid["greedy_agreement"], fid["prompts"]) == (1.0, 3) and fid["kl_per_token"] < 1e-6
    problems = saved["tasks"]["humaneval"]["problems"]
    assert [p["task_id"] for p in problems] == ["HumanEval/23", "HumanEval/53", "HumanEval/28"]
    assert all(p["dense_status"] in ("passed", "failed", "timeout", "crashed") for p in problems)
    assert saved["tasks"]["humaneval"]["fidelity"]["surgical"]["greedy_agreement"] == 1.0
    assert saved["tasks"]["instructions"]["dense"]["prompts"] == 3
    assert saved["tasks"]["fidelity"]["prompt_set"] == "instructions"  # decoded once for both
    assert saved["tasks"]["retrieval"]["dense"]["prompts"] == 3
    long = saved["tasks"]["fidelity_long"]      # one held-out play and one stdlib module
    assert (long["surgical"]["prompts"], long["prompt_tokens"], long["routed_share"]) == (2, 224, 1)


# ----------------------------------------------------------------------------- fidelity_long

@pytest.mark.slow
def test_fidelity_long_against_numpy_per_domain(monkeypatch):
    """Long prompts from held-out documents: the prompts are each document's first tokens,
    every scored token lies past the window (routed_share 1), and the numbers of all prompts
    and of each domain equal recomputation without a cache, in float64."""
    from ultrametric_jax.run.data_corpus import Document
    from ultrametric_jax.run.tasks import fidelity_long
    rng = np.random.default_rng(11)
    words = {name: [rng.integers(1, 96, size=n).tolist() for n in sizes]
             for name, sizes in (("prose", (50, 30)), ("code", (12, 40, 45)))}
    docs = {name: [Document(f"{name}{i}", " ".join(f"w{t}" for t in w))
                   for i, w in enumerate(ws)] for name, ws in words.items()}
    monkeypatch.setattr(fidelity_long, "domain_documents", lambda: docs)
    monkeypatch.setattr(fidelity_long, "PROMPT_TOKENS", 24)
    monkeypatch.setattr(fidelity_long, "PROMPTS_PER_DOMAIN", 2)
    monkeypatch.setattr(fidelity_long, "MAX_NEW_TOKENS", 6)
    dense_model, surgical_model = tiny_model(seed=2), surgical_twin(seed=2, router_seed=5)
    result = fidelity_long.run(context(*contestants(dense_model, surgical_model)))
    # The first 24 tokens of the first two documents with that many (code0 has 12).
    expected = {"prose": [w[:24] for w in words["prose"]],
                "code": [w[:24] for w in words["code"][1:]]}
    fd, fs = jit_forward(dense_model), jit_forward(surgical_model)
    totals = {"div": 0, "n": 0, "kl": 0.0}
    for name, prompts in expected.items():
        dense_tokens = [naive_greedy(fd, p, 6) for p in prompts]
        surgical_tokens = [naive_greedy(fs, p, 6) for p in prompts]
        div = [first_divergence(d, s) for d, s in zip(dense_tokens, surgical_tokens)]
        kl = sum(np_kl(padded_logits(fd, p + d[:-1])[len(p) - 1:],
                       padded_logits(fs, p + d[:-1])[len(p) - 1:]).sum()
                 for p, d in zip(prompts, dense_tokens))
        got = result["domains"][name]
        assert got["greedy_agreement"] == pytest.approx(sum(div) / (6 * len(prompts)), abs=1e-12)
        assert got["kl_per_token"] == pytest.approx(kl / (6 * len(prompts)), rel=1e-3)
        totals["div"] += sum(div)
        totals["n"] += 6 * len(prompts)
        totals["kl"] += kl
    s = result["surgical"]
    assert 0 < totals["div"] < totals["n"]       # the routers change some tokens, not all
    assert s["greedy_agreement"] == pytest.approx(totals["div"] / totals["n"], abs=1e-12)
    assert s["kl_per_token"] == pytest.approx(totals["kl"] / totals["n"], rel=1e-3)
    assert (s["prompts"], result["prompt_tokens"], result["routed_share"]) == (4, 24, 1.0)
    assert result["dense"]["greedy_agreement"] == 1.0
    assert "fidelity_long:" in fidelity_long.summary(result) and "code" in \
        fidelity_long.summary(result)


def test_fidelity_long_prompts_come_from_held_out_documents():
    """Prose and code prompts are documents of the validation split the training data
    pipeline uses (never a training document)."""
    from ultrametric_jax.run.data_corpus import load_corpus, split_documents
    from ultrametric_jax.run.tasks import fidelity_long
    docs = fidelity_long.domain_documents()
    assert set(docs) == {"prose", "code"} and all(docs.values())
    train = {d.doc_id for d in split_documents(load_corpus("shakespeare"),
                                               fidelity_long.VAL_FRACTION)[0]}
    assert train and not train & {d.doc_id for d in docs["prose"]}
    prompts = fidelity_long.long_prompts(lambda text: text.split(), docs["code"], 3, 50)
    assert len(prompts) == 3 and all(len(p) == 50 for p in prompts)


def test_fidelity_long_errors_name_the_problem(monkeypatch):
    from ultrametric_jax.run.data_corpus import Document
    from ultrametric_jax.run.tasks import fidelity_long
    monkeypatch.setattr(fidelity_long, "domain_documents",
                        lambda: {"prose": [Document("a", "w1 w2 w3")]})
    ctx = context(*contestants(tiny_model(), surgical_twin()), fast=True)
    with pytest.raises(TaskError, match="fidelity_long: no held-out document has 224 tokens"):
        fidelity_long.run(ctx)
    ctx.max_context = 16
    with pytest.raises(TaskError, match="fidelity_long: a context of 16 tokens leaves no room "
                                        "for a prompt and 16 new tokens"):
        fidelity_long.run(ctx)
