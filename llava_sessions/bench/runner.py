"""Run the benchmark: one conversation, the same token histories through strategies (a)-(d);
then the long conversation (``_LongConversation``), through (a) and (b)."""

from __future__ import annotations

import base64
import io
import os
import platform
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llava_sessions.bench import stats

# ~20 tokens each with the offline tokenizer (the reply's "question_tokens" has the exact counts).
QUESTIONS = [
    "Describe the scene in detail, including the colors of the buildings, the sky and the street.",
    "How many people are standing near the window, and what are they doing in the picture?",
    "What color is the car parked on the side of the street in front of the white house?",
    "Is there a cat or a dog in the image, and where is it sitting in the room?",
    "What is written on the sign above the door of the shop, and what color are the letters?",
    "What time of day is it, judging by the light and the long shadows in the photo?",
    "Can you tell me what the man on the left is holding in his hands right now?",
    "What food is on the table, and is there a glass of water next to the plate?",
    "Where was this photo probably taken, and what can you see far away in the background?",
    "Are the children playing football on the grass, and are their parents watching from a bench?",
    "What animal is eating grass in the field, and what color is the wooden fence around it?",
    "Please count the apples in the basket and tell me how many are red and how many are green.",
]

# Cold opens timed per repeat, each next to a stateless turn 1 (which goes first alternates): timed
# apart, the two saw different moments of a VM whose speed drifts by 10-20% within a run.
COLD_OPEN_PAIRS = 3

SESSION_CONTEXT_TOKENS = 620  # "a 620-token first turn": one image (576) plus a question and template
GPU_7B_TOTAL_GB = 80.0
GPU_7B_WEIGHTS_GB = 14.0


@dataclass
class Options:
    preset: str = "small"
    model: str | None = None
    turns: int = 6
    repeats: int = 3
    max_new_tokens: int = 24
    concurrency: int = 8
    device: str = "auto"
    budget_gb: float | None = None
    work_dir: Path | None = None
    compile: str = "auto"  # the served worker's decode step (ServingConfig.compile)
    long_conversation: bool = True  # also time the long conversation (stats.plan_long_conversation)

    def command(self) -> str:
        parts = ["llava-sessions", "bench", "--preset", self.preset]
        if self.model:
            parts += ["--model", self.model]
        parts += ["--turns", str(self.turns), "--repeats", str(self.repeats),
                  "--max-new-tokens", str(self.max_new_tokens), "--concurrency", str(self.concurrency),
                  "--device", self.device]
        if self.budget_gb is not None:
            parts += ["--budget-gb", str(self.budget_gb)]
        if self.compile != "auto":
            parts += ["--compile", self.compile]
        if not self.long_conversation:
            parts.append("--no-long-conversation")
        return shlex.join(parts)


class BenchError(RuntimeError):
    pass


BENCH_IMAGE_FORMAT = "JPEG"  # how photos travel; a PNG of this noisy image is ~7x larger


def bench_image_b64(width: int = 640, height: int = 480, seed: int = 0) -> str:
    """A deterministic photo-sized RGB image (smooth gradients plus mild noise), as base64 JPEG (quality 90)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        128 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0),
        255 * x / width,
        255 * (1 - y / height),
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=BENCH_IMAGE_FORMAT, quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


# Bench preset -> (model family, its tiny_model preset). The 7B-class ones have a real
# checkpoint's exact geometry and are written in float16: about 14-15 GB of disk, once per kind
# of device.
BENCH_PRESETS: dict[str, tuple[str, str]] = {
    "tiny": ("llava", "tiny"),
    "small": ("llava", "small"),
    "llava-1.5-7b": ("llava", "llava-1.5-7b"),  # llava-hf/llava-1.5-7b-hf
    "llava-next-mistral-7b": ("next", "llava-next-mistral-7b"),  # llava-hf/llava-v1.6-mistral-7b-hf
    "onevision-0.5b": ("onevision", "llava-onevision-qwen2-0.5b"),  # llava-hf/llava-onevision-qwen2-0.5b-ov-hf
}
FLOAT16_PRESETS = ("llava-1.5-7b", "llava-next-mistral-7b")  # on a CPU too: 14-15 GB in float32 would not do
FLOAT16_ON_GPU_PRESETS = ("onevision-0.5b",)  # float32 on a CPU, where half precision is slow


def geometry_for(preset: str):
    """The tiny_model geometry of a bench preset."""
    from llava_sessions.tiny_model import geometry_of

    family, name = BENCH_PRESETS[preset]
    return geometry_of(name, family)


def checkpoint_for(options: Options) -> Path:
    """--model as given, else the preset's random-weight checkpoint (written once to the cache)."""
    from llava_sessions import models

    if options.model:
        return models.resolve_model(options.model)
    family, name = BENCH_PRESETS[options.preset]
    if options.preset in FLOAT16_PRESETS + FLOAT16_ON_GPU_PRESETS:
        import torch

        from llava_sessions.tiny_model import write_tiny_llava

        # Drawn on the GPU when there is one: on a CPU a 7B draw takes minutes.
        init_device = "cuda" if torch.cuda.is_available() else "cpu"
        half = options.preset in FLOAT16_PRESETS or init_device == "cuda"
        dtype = torch.float16 if half else torch.float32
        return write_tiny_llava(models.home() / "models" / f"{name}-{family}-seed0-{str(dtype)[6:]}-{init_device}",
                                preset=name, dtype=dtype, init_device=init_device, family=family)
    return models.ensure_tiny_model(name)


def resolve_device(requested: str):
    import torch

    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def machine_info(device) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    return info


def memory_budget(device, budget_gb: float | None) -> tuple[float, str]:
    if budget_gb is not None:
        return budget_gb * 1e9, "--budget-gb"
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return float(free), "free GPU memory after loading the model (server worker and bench both loaded)"
    import psutil

    return float(psutil.virtual_memory().available), "available host memory (server worker and bench both loaded)"


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """The engine's accounting (generation.cache_bytes): K and V, every layer, per token."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def accounting_for(geometry, dtype_bytes: int, context_tokens: int, image_tokens: int | None = None) -> dict:
    """features + KV of one session with one image (``image_tokens``, default the geometry's fixed
    count) and ``context_tokens`` tokens, from the config."""
    head_dim = geometry.text_hidden_size // geometry.text_num_heads
    per_token = kv_bytes_per_token(geometry.text_num_layers, geometry.text_num_kv_heads, head_dim, dtype_bytes)
    tokens = geometry.num_image_tokens if image_tokens is None else image_tokens
    features = tokens * geometry.text_hidden_size * dtype_bytes
    return {"kv_bytes_per_token": per_token, "feature_bytes": features,
            "session_bytes": features + per_token * context_tokens}


def preset_of(config) -> str | None:
    """The preset whose shape a checkpoint's LlavaConfig has (weights aside), else None."""
    from llava_sessions.tiny_model import PRESETS

    vision, text = config.vision_config, config.text_config
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    shape = (vision.image_size, vision.patch_size, vision.hidden_size, vision.intermediate_size,
             vision.num_hidden_layers, vision.num_attention_heads, text.hidden_size, text.intermediate_size,
             text.num_hidden_layers, text.num_attention_heads, kv_heads, text.vocab_size)
    for name, g in PRESETS.items():
        if shape == (g.image_size, g.patch_size, g.vision_hidden_size, g.vision_intermediate_size,
                     g.vision_num_layers, g.vision_num_heads, g.text_hidden_size, g.text_intermediate_size,
                     g.text_num_layers, g.text_num_heads, g.text_num_kv_heads, g.vocab_size):
            return name
    return None


def run(options: Options, log=print) -> dict:
    import torch

    from llava_sessions.bench import served
    from llava_sessions.bench.inprocess import InProcess, reference_run
    from llava_sessions.bench.inprocess import decode_image as inprocess_decode_image
    from llava_sessions.handler.engine import host_allocator
    from llava_sessions.handler.engine.model_loader import load_model
    from llava_sessions.tiny_model import PRESETS

    if options.turns < 2 or options.repeats < 1 or options.max_new_tokens < 2 or options.concurrency < 1:
        raise BenchError("--repeats and --concurrency must be >= 1, --turns and --max-new-tokens >= 2 "
                         "(follow-ups need a second turn)")
    wall_start = time.perf_counter()
    # The in-process strategies run under the served worker's malloc policy: the ratios compare
    # strategies, not allocators.
    host_allocator.keep_freed_memory()
    device = resolve_device(options.device)
    prompts = [QUESTIONS[k % len(QUESTIONS)] for k in range(options.turns)]
    turns = options.turns
    model_dir = checkpoint_for(options)
    log(f"bench: model {model_dir} on {device}")
    loaded = load_model(str(model_dir), device)
    image_b64 = bench_image_b64()

    reference = reference_run(loaded, image_b64, prompts[:turns], options.max_new_tokens)
    inproc = InProcess(loaded, image_b64, reference)
    # Warm-up (first calls allocate and pick kernels); not timed.
    inproc.stateless_ttft(0)
    inproc.pixel_cache_ttft(0)
    inproc.floor_ttft(0, inproc.floor_cache(0))

    K, R = turns, options.repeats
    stateless = [[] for _ in range(K)]
    pixel_cache = [[] for _ in range(K)]
    floor = [[] for _ in range(K)]
    floor_decode = [[] for _ in range(K)]
    bare_total = [[] for _ in range(K)]
    first_token = {"stateless": True, "pixel_cache": True, "floor": True}
    repeats_a: list = []
    conc: list = []
    mismatches: list[str] = []
    tokenizer = loaded.tokenizer

    with tempfile.TemporaryDirectory(prefix="llava-bench-", dir=options.work_dir) as tmp:
        log("bench: starting the serving stack (1 worker, in its own process)")
        with served.StackProcess(model_dir, Path(tmp), options.device, compile=options.compile) as stack:
            client = served.Client(stack.url)
            served.warm_up(client, image_b64, prompts)
            for r in range(R):
                log(f"bench: repeat {r + 1}/{R}")
                cold = []
                for pair in range(COLD_OPEN_PAIRS):
                    ours_first = (r * COLD_OPEN_PAIRS + pair) % 2 == 0
                    if ours_first:
                        cold.append(served.cold_open(client, image_b64, prompts[0]))
                    seconds, token = inproc.stateless_ttft(0)
                    if not ours_first:
                        cold.append(served.cold_open(client, image_b64, prompts[0]))
                    stateless[0].append(seconds)
                    first_token["stateless"] &= token == reference.turns[0].answer_ids[0]
                repeats_a.append(served.staircase(client, image_b64, prompts[:K], options.max_new_tokens))
                repeats_a[-1].cold = cold
                for k, turn in enumerate(reference.turns):
                    expected = turn.answer_ids[0]
                    if k > 0:  # turn 1's stateless samples are the cold opens' pairs
                        seconds, token = inproc.stateless_ttft(k)
                        stateless[k].append(seconds)
                        first_token["stateless"] &= token == expected
                    seconds, token = inproc.pixel_cache_ttft(k)
                    pixel_cache[k].append(seconds)
                    first_token["pixel_cache"] &= token == expected
                    cache = inproc.floor_cache(k)
                    seconds, token = inproc.floor_ttft(k, cache)
                    floor[k].append(seconds)
                    first_token["floor"] &= token == expected
                    floor_decode[k].append(inproc.floor_decode_step(k, cache, expected))
                    if len(turn.answer_ids) >= 2:
                        seconds, _ = inproc.bare_generate_total(k, len(turn.answer_ids))
                        bare_total[k].append(seconds)
            log(f"bench: concurrency ({options.concurrency} sessions vs 1)")
            for r in range(R):
                conc.append(served.concurrency(client, image_b64, prompts, options.max_new_tokens, options.concurrency))
            long = None
            if options.long_conversation and loaded.fixed_image_tokens is None:
                log(f"bench: no long conversation: it plans every image at one token count, and a "
                    f"{loaded.model.config.model_type} image's count depends on its size")
            elif options.long_conversation:
                plan = long_conversation_plan(loaded, options.max_new_tokens)
                if plan is None:
                    log("bench: no long conversation: one image and one turn do not fit this model's context")
                else:
                    long = _LongConversation(loaded, plan, options.max_new_tokens)
                    log(f"bench: long conversation ({plan.turns} turns, {len(plan.image_turns)} images,"
                        f" about {plan.planned_tokens} tokens of history)")
                    long.time(client, R)
            worker_step = served.worker_step_counts(Path(tmp))

    # --- correctness: (a) on the reference histories gives the reference answers ----------------
    # A mismatch is looked at where the answers part: a near tie of the best two logits there is
    # rounding (half precision, other kernel shapes), anything else is a fault.
    divergence = _Divergence(inproc, tokenizer, torch.finfo(loaded.dtype).eps)
    analysis: list[dict] = []
    for r, samples in enumerate(repeats_a):
        for k, turn in enumerate(reference.turns):
            where = f"repeat {r + 1} turn {k + 1}"
            first_text = tokenizer.decode(turn.answer_ids[:1], skip_special_tokens=True)
            for probe in samples.probes(k):
                _check_history(where, probe, turn, mismatches, analysis)
                if probe.text != first_text:
                    mismatches.append(f"{where}: first token {probe.text!r} != {first_text!r}")
                    analysis.append({"where": where, "kind": "first_token", **divergence.at(turn, probe.text, 0)})
            streamed = [samples.streamed[k]] if k in samples.streamed else []
            for sample in samples.full.get(k, []) + streamed:
                _check_answer(where, sample, turn, divergence, mismatches, analysis)
    if long:
        long.check(_Divergence(long.inproc, tokenizer, divergence.eps), mismatches, analysis)

    # --- figures ---------------------------------------------------------------------------
    # Turn 1 of ours is a cold open: one request opens with the image and the first question.
    ours_samples = [[p.seconds for s in repeats_a for p in s.probes(k)] for k in range(K)]
    full_samples = [[x.seconds for rep in repeats_a for x in rep.full[k]] for k in range(K)]
    # The streamed session's first events (turn 1 there follows an image-only open: not a cold open).
    streamed_samples = [[rep.streamed[k].first_event_seconds for rep in repeats_a] for k in range(K)]
    samples = {"ours": ours_samples, "stateless": stateless, "pixel_cache": pixel_cache, "floor": floor}
    figures = {}
    for reducer_name, reducer in (("median", stats.median), ("min", min)):
        figures[reducer_name] = _figures(reducer, samples, full_samples, bare_total, conc, reference)
    ttft = figures["median"]["ttft"]
    ratios = figures["median"]["ratios"]
    long_summary = long.summary(stats.median) if long else None
    ratios["long_conversation_stateless_vs_ours"] = long_summary["stateless_vs_ours"] if long else None
    figures["min"]["ratios"]["long_conversation_stateless_vs_ours"] = (
        long.summary(min)["stateless_vs_ours"] if long else None)
    streamed_ttft = stats.per_turn_medians(streamed_samples)
    ours_tps, bare_tps = figures["median"]["ours_tps"], figures["median"]["bare_tps"]
    full_total = figures["median"]["full_total"]

    # --- memory ----------------------------------------------------------------------------
    dtype_bytes = torch.tensor([], dtype=loaded.dtype).element_size()
    first = reference.turns[0]
    kv_tokens_after_first = (reference.turns[1].cached_tokens if K >= 2
                             else len(first.context_ids) + len(first.answer_ids) - 1)
    measured_per_token = (first.bytes_held_after - reference.bytes_after_open) / kv_tokens_after_first
    measured_session = reference.bytes_after_open + measured_per_token * SESSION_CONTEXT_TOKENS
    budget, budget_source = memory_budget(device, options.budget_gb)
    geometry = geometry_for(options.preset) if not options.model else None
    # The targets are set per model shape and device: --model is held to a preset's targets
    # only when its config has that preset's shape.
    shape = preset_of(loaded.model.config) if options.model else options.preset
    # The bench image's own count: a LLaVA-NeXT image's depends on its size.
    image_tokens = loaded.image_tokens([inprocess_decode_image(image_b64)])[0]
    own_accounting = (accounting_for(geometry, dtype_bytes, SESSION_CONTEXT_TOKENS, image_tokens)
                      if geometry else None)
    seven_b = accounting_for(PRESETS["llava-1.5-7b"], 2, SESSION_CONTEXT_TOKENS)
    # Less the decode arena a CUDA-graph worker keeps (runner.kept_arena_slots).
    from llava_sessions.handler.engine.runner import KEPT_ARENA_ROWS, kept_arena_slots

    seven_b_budget = (GPU_7B_TOTAL_GB - GPU_7B_WEIGHTS_GB) * 1e9
    kept_slots = kept_arena_slots(PRESETS["llava-1.5-7b"].max_position_embeddings, int(seven_b_budget),
                                  seven_b["kv_bytes_per_token"])
    kept_arena = KEPT_ARENA_ROWS * kept_slots * seven_b["kv_bytes_per_token"]
    seven_b_budget -= kept_arena

    decode_ours = [ours_tps.get(k) for k in range(K)]
    result = {
        **ratios,
        "ratios_best_of_repeats": figures["min"]["ratios"],
        "targets": stats.verdicts(stats.targets_for(shape, device.type), ratios),  # None: no targets set
        "targets_note": stats.targets_note(shape, device.type),
        "model_shape": shape,
        "answers_match_reference": not mismatches,
        "answers_match_up_to_near_ties": all(m["near_tie"] for m in analysis),
        "mismatches": mismatches[:20],
        "mismatch_analysis": analysis[:20],
        "first_token_agrees_with_reference": first_token,
        "ttft_s": ttft,
        "ttft_best_s": figures["min"]["ttft"],
        "ttft_samples_s": {
            "ours": ours_samples, "stateless": stateless, "pixel_cache": pixel_cache, "floor": floor,
            "ours_streamed_first_event": streamed_samples,
        },
        # Informational: a streamed turn's first event against the same turn unstreamed (one token).
        "ours_streamed_first_event_s": streamed_ttft,
        "followup_streamed_first_event_vs_ours": stats.median_ratio(
            stats.followup(streamed_ttft), stats.followup(ttft["ours"])),
        "cold_open_s": {
            "ours_open_with_question": ttft["ours"][0],
            "ours_image_only_open": stats.median(x for s in repeats_a for x in s.open_s),
            "stateless_turn1": ttft["stateless"][0],
            "pairs": len(ours_samples[0]),
            # cold_open_vs_stateless is the median of the pairs' ratios; the medians' ratio beside it
            "ratio_of_medians": stats.ratio(ttft["ours"][0], ttft["stateless"][0]),
        },
        # The absolute figures under one name each (stats.absolute_figures); the keys below keep
        # the same numbers in their places.
        "absolute": stats.absolute_figures(
            ttft["ours"], decode_ours, options.concurrency,
            concurrent_tps=stats.median(c.concurrent_tps for c in conc),
            single_tps=stats.median(c.single_tps for c in conc),
            long_conversation_ttft_s=long_summary["ttft_ours_s"] if long else None),
        "decode_tps": {
            "ours": decode_ours,
            "bare_generate": [bare_tps.get(k) for k in range(K)],
            "floor_one_step": [1.0 / stats.median(v) for v in floor_decode],
            "ours_full_turn_s": full_total,
        },
        "concurrency": {
            "sessions": options.concurrency,
            "single_tps": stats.median(c.single_tps for c in conc),
            "concurrent_tps": stats.median(c.concurrent_tps for c in conc),
            "samples": [c.__dict__ for c in conc],
        },
        "long_conversation": long.result(long_summary) if long else None,
        "bytes_per_session": {
            "after_open": reference.bytes_after_open,
            "after_turn": [t.bytes_held_after for t in reference.turns],
            "kv_bytes_per_token_measured": measured_per_token,
            "accounting_from_config": own_accounting,
            "accounting_matches_measurement": (
                own_accounting is not None
                and own_accounting["kv_bytes_per_token"] == measured_per_token
                and own_accounting["feature_bytes"] == reference.bytes_after_open
            ),
        },
        "sessions_fit": {
            "context_tokens": SESSION_CONTEXT_TOKENS,
            "measured": {
                "device": str(device),
                "session_bytes": measured_session,
                "budget_bytes": budget,
                "budget_source": budget_source,
                "sessions": stats.sessions_fit(budget, measured_session),
            },
            "llava_1_5_7b_fp16_80gb": {
                **seven_b,
                "budget_bytes": seven_b_budget,
                "budget_source": f"{GPU_7B_TOTAL_GB:g} GB GPU minus {GPU_7B_WEIGHTS_GB:g} GB of weights "
                                 f"and {kept_arena / 1e9:.1f} GB of kept decode arena",
                "sessions": stats.sessions_fit(seven_b_budget, seven_b["session_bytes"]),
                "target_sessions": stats.GPU_7B_HOT_SESSIONS_TARGET,
            },
        },
        "conversation": {
            "turns": K,
            "repeats": R,
            "max_new_tokens": options.max_new_tokens,
            "question_tokens": reference.question_tokens,
            "context_tokens": [len(t.context_ids) for t in reference.turns],
            "cached_tokens": [t.cached_tokens for t in reference.turns],
            "answer_tokens": [len(t.answer_ids) for t in reference.turns],
            "reference_answers": [t.text for t in reference.turns],
        },
        "image": {"format": BENCH_IMAGE_FORMAT, "size": [640, 480], "base64_bytes": len(image_b64)},
        "machine": machine_info(device),
        "preset": options.preset,
        # The served step, as its worker reports it (metrics): compiled when it compiled graphs;
        # with CUDA graphs when on CUDA every compiled graph was captured (none skipped).
        "compile": {"setting": options.compile,
                    "compiled": bool(worker_step.get("llava_step_compiles")),
                    "cuda_graphs": device.type == "cuda" and bool(worker_step.get("llava_step_compiles"))
                    and not worker_step.get("llava_cuda_graph_skips"),
                    "worker_counts": worker_step},
        "model_dir": str(model_dir),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "command": options.command(),
        "wall_s": time.perf_counter() - wall_start,
    }
    result["step_targets"] = stats.step_verdicts(shape, device.type, result["compile"]["compiled"],
                                                 {**ratios, **result["absolute"]})
    return result


def long_conversation_plan(loaded, max_new_tokens: int) -> stats.LongPlan | None:
    """The long conversation that fits ``loaded``'s context (stats.plan_long_conversation), its
    turns counted with the engine's own formatter."""
    from functools import cache

    from llava_sessions.handler.engine.prompt import Conversation, TurnFormatter

    image_tokens = loaded.fixed_image_tokens
    if image_tokens is None:
        raise NotImplementedError("the long conversation counts every image alike: fixed-size families only")
    formatter = TurnFormatter(loaded.tokenizer, loaded.image_token_id)
    earlier = Conversation()
    earlier.messages += [earlier.user_message(QUESTIONS[0], 1), Conversation.assistant_message("An answer.")]

    @cache
    def text_tokens(question: int, first: bool, n_images: int) -> int:
        ids = formatter.user_turn_ids(Conversation() if first else earlier, QUESTIONS[question],
                                      [image_tokens] * n_images)
        return len(ids) - n_images * image_tokens

    return stats.plan_long_conversation(
        lambda k, n: text_tokens(k % len(QUESTIONS), k == 0, n), image_tokens, loaded.max_context,
        max_new_tokens, closing_tokens=len(formatter.closing_ids([], loaded.eos_token_ids)))


class _LongConversation:
    """The long conversation: its full turns (images spread over them) then one-token probe turns,
    timed through (a) one served session kept across its turns and (b) stateless ``generate``
    over the full history with every image so far, each turn. Both on the reference histories."""

    def __init__(self, loaded, plan: stats.LongPlan, max_new_tokens: int):
        from llava_sessions.bench.inprocess import InProcess, reference_run

        self.started = time.perf_counter()
        self.plan = plan
        # Image 0 is the main conversation's; the others are drawn with other noise seeds.
        self.images = [bench_image_b64(seed=j) for j in range(len(plan.image_turns))]
        self.prompts = [QUESTIONS[k % len(QUESTIONS)] for k in range(plan.turns)]
        self.max_new = [max_new_tokens] * plan.full_turns + [1] * plan.probe_turns
        self.turn_images: list[list[str]] = [[] for _ in self.prompts]
        for j, turn in enumerate(plan.image_turns[1:], start=1):
            self.turn_images[turn].append(self.images[j])
        self.reference = reference_run(loaded, self.images[0], self.prompts, self.max_new, self.turn_images)
        self.inproc = InProcess(loaded, self.images, self.reference)
        self.probes = list(range(plan.full_turns, plan.turns))
        self.replays: list = []
        self.ours: list[list[float]] = [[] for _ in self.probes]
        self.stateless: list[list[float]] = [[] for _ in self.probes]
        self.stateless_first_token = True
        self.matches: bool | None = None  # the served answers against the reference, once checked

    def _replay(self, client):
        from llava_sessions.bench import served

        return served.conversation(client, self.images[0], self.prompts, self.max_new, self.turn_images)

    def time(self, client, repeats: int) -> None:
        # Warm-up, not timed: the longest stateless prefill, and one served replay (its lengths).
        self.inproc.stateless_ttft(self.probes[-1])
        self._replay(client)
        for _ in range(repeats):
            samples = self._replay(client)
            self.replays.append(samples)
            for i, k in enumerate(self.probes):
                self.ours[i].append(samples[k].seconds)
                seconds, token = self.inproc.stateless_ttft(k)
                self.stateless[i].append(seconds)
                self.stateless_first_token &= token == self.reference.turns[k].answer_ids[0]
        self.wall_s = time.perf_counter() - self.started

    def check(self, divergence: "_Divergence", mismatches: list[str], analysis: list[dict]) -> None:
        """Every served turn's history and answer against the reference (a probe's answer is its one token)."""
        before = len(mismatches)
        for r, samples in enumerate(self.replays):
            for k, (sample, turn) in enumerate(zip(samples, self.reference.turns)):
                where = f"long conversation, repeat {r + 1} turn {k + 1}"
                _check_history(where, sample, turn, mismatches, analysis)
                _check_answer(where, sample, turn, divergence, mismatches, analysis)
        self.matches = len(mismatches) == before

    def summary(self, reduce) -> dict:
        return stats.long_conversation_summary(self.ours, self.stateless, reduce)

    def result(self, summary: dict) -> dict:
        turns = self.reference.turns
        return {
            "history_tokens": len(turns[-1].context_ids),  # the last turn's whole prompt, images included
            "turns": self.plan.turns,
            "images": len(self.images),
            **{key: summary[key] for key in ("ttft_ours_s", "ttft_stateless_s", "stateless_vs_ours")},
            "history_limit_tokens": self.plan.limit_tokens,  # min(target, context - an answer's tokens)
            "target_history_tokens": stats.LONG_HISTORY_TOKENS,
            "image_turns": [t + 1 for t in self.plan.image_turns],  # 1-based; the first opens the session
            "timed_turns": [k + 1 for k in self.probes],
            "context_tokens": [len(turns[k].context_ids) for k in self.probes],
            "cached_tokens": [turns[k].cached_tokens for k in self.probes],
            "answer_tokens": [len(t.answer_ids) for t in turns],
            "ttft_ours_per_turn_s": summary["ttft_ours_per_turn_s"],
            "ttft_stateless_per_turn_s": summary["ttft_stateless_per_turn_s"],
            "ttft_samples_s": {"ours": self.ours, "stateless": self.stateless},
            "answers_match_reference": self.matches,
            "stateless_first_token_agrees": self.stateless_first_token,
            "wall_s": self.wall_s,  # what the scenario added to the run, its reference run included
        }


def _check_history(where: str, sample, turn, mismatches: list[str], analysis: list[dict]) -> None:
    """The server's history of a turn (its tokens, and those it had cached) against the reference's."""
    if (sample.prompt_tokens, sample.cached_tokens) != (len(turn.context_ids), turn.cached_tokens):
        mismatches.append(f"{where}: server history {sample.prompt_tokens} tokens ({sample.cached_tokens} cached),"
                          f" reference {len(turn.context_ids)} ({turn.cached_tokens} cached)")
        analysis.append({"where": where, "kind": "history", "near_tie": False})


def _check_answer(where: str, sample, turn, divergence: "_Divergence", mismatches: list[str],
                  analysis: list[dict]) -> None:
    """A served answer in full against the reference's; where they part, how near a tie it was."""
    if sample.text != turn.text or sample.completion_tokens != len(turn.answer_ids):
        mismatches.append(f"{where}: answer {sample.text!r} != {turn.text!r}")
        analysis.append({"where": where, "kind": "answer", **divergence.at(turn, sample.text)})


class _Divergence:
    """Where a server answer parts from the reference, and how close the best two logits are there."""

    def __init__(self, inproc, tokenizer, eps: float):
        self.inproc, self.tokenizer, self.eps = inproc, tokenizer, eps
        self._seen: dict[tuple, dict] = {}

    def at(self, turn, other_text: str, index: int | None = None) -> dict:
        key = (tuple(turn.context_ids), other_text, index)
        if key not in self._seen:
            if index is None:
                prefixes = [self.tokenizer.decode(turn.answer_ids[:j], skip_special_tokens=True)
                            for j in range(len(turn.answer_ids) + 1)]
                index = stats.divergence_index(prefixes, other_text)
            index = min(index, len(turn.answer_ids) - 1)
            token = turn.answer_ids[index]
            gap, top = self.inproc.logit_gap(turn.context_ids + turn.answer_ids[:index], token)
            tolerance = stats.tie_tolerance(self.eps, top)
            self._seen[key] = {"token_index": index, "reference_token": token, "logit_gap": gap,
                               "tolerance": tolerance, "near_tie": abs(gap) <= tolerance}
        return self._seen[key]


def _figures(reduce, samples, full_samples, bare_total, conc, reference) -> dict:
    """TTFT per turn, decode rates and the six ratios, each repeat set reduced with ``reduce``."""
    ttft = {name: [reduce(turn) for turn in values] for name, values in samples.items()}
    follow = {name: stats.followup(values) for name, values in ttft.items()}
    full_total = [reduce(v) for v in full_samples]
    # Decode rate per turn with N >= 2 answer tokens: (N - 1) / (full turn - TTFT). It does not depend
    # on the turn much, so the ratio is the median over all such turns (noise on one turn drops out).
    # Not turn 1: its TTFT is a cold open, which also runs the vision tower, while its full turn
    # follows an image-only open.
    ours_tps, bare_tps = {}, {}
    for k, turn in enumerate(reference.turns):
        n = len(turn.answer_ids)
        if n < 2 or k == 0:
            continue
        try:
            ours = stats.decode_tps(full_total[k], ttft["ours"][k], n)
            bare = stats.decode_tps(reduce(bare_total[k]), ttft["pixel_cache"][k], n)
        except ValueError:  # a full turn not slower than its probe: noise swamped the decode time
            continue
        ours_tps[k], bare_tps[k] = ours, bare
    if not ours_tps:
        raise BenchError("no turn gave a decode rate (answers of one token, or noise larger than the "
                         "decode time); raise --max-new-tokens or --repeats")
    decode_turns = sorted(ours_tps)
    ratios = {
        "followup_ttft_speedup_vs_stateless": stats.median_ratio(follow["stateless"], follow["ours"]),
        "followup_ttft_speedup_vs_pixel_cache": stats.median_ratio(follow["pixel_cache"], follow["ours"]),
        "followup_ttft_vs_floor": stats.median_ratio(follow["ours"], follow["floor"]),
        # Turn 1: the cold opens over the stateless turns 1 timed next to them, pair by pair (the
        # pairs run back to back so that the VM's drift within a run cancels); best of repeats:
        # the fastest of each.
        "cold_open_vs_stateless": (stats.median_ratio(samples["ours"][0], samples["stateless"][0])
                                   if reduce is not min else stats.ratio(ttft["ours"][0], ttft["stateless"][0])),
        "decode_tps_vs_bare": stats.median_ratio([ours_tps[k] for k in decode_turns],
                                                 [bare_tps[k] for k in decode_turns]),
        "concurrent8_tps_vs_single": stats.ratio(
            stats.median(c.concurrent_tps for c in conc) if reduce is not min else max(c.concurrent_tps for c in conc),
            stats.median(c.single_tps for c in conc) if reduce is not min else max(c.single_tps for c in conc),
        ),
    }
    return {"ttft": ttft, "ratios": ratios, "ours_tps": ours_tps, "bare_tps": bare_tps,
            "full_total": full_total}
