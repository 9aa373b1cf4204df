"""`LlamaxLM`: an lm-evaluation-harness model backed by llamax (registered as `llamax` by
`llamax.lm_eval`).

    lm = LlamaxLM(checkpoint="runs/tiny")                           # any checkpoint load_any reads
    lm = LlamaxLM.from_params(config, params, tokenizer, mesh=mesh)  # a model held in memory

Requests are answered the way lm-eval's `hf` backend answers them, so the numbers are the same
for the same weights: the same tokenization (BOS as the tokenizer adds it, not twice when the
text starts with it; special tokens in text parsed), context/continuation split (lm-eval's
`TemplateLM`), rolling windows (lm-eval's `get_rolling_token_windows` + `make_disjoint_window`),
generation kwargs (`normalize_gen_kwargs`), stop sequences (`handle_stop_sequences`, cut with
`postprocess_generated_text`). Differences by design: a request longer than `max_length` is an
error naming the fix (the hf backend cuts it from the left silently; `truncate_left=True` does
that too), and unsupported generation kwargs are refused instead of ignored.

The arithmetic is llamax's: loglikelihoods from `llamax.infer.scoring.SequenceScorer`, text from
`llamax.infer.generate.generate` (KV cache, ragged batches, stop strings checked every
`check_every` tokens), both batched into bucketed shapes and sharded on `mesh`. With several
processes (`jax.distributed`), lm-eval gives each process its share of the requests (rank =
`jax.process_index()`); the processes exchange their requests, every global batch is split over
all devices, and each process returns the answers to its own share.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llamax.config import ModelConfig
from llamax.dtypes import float_dtype_name
from llamax.errors import CheckpointError, ConfigError, DataError
from llamax.infer.generate import generate
from llamax.infer.scoring import SequenceScorer
from llamax.model.quantize import check_weights, quantize_weights
from llamax.sharding import MESH_PRESETS, MeshConfig, Rules, make_mesh

logger = logging.getLogger(__name__)
DEFAULT_MAX_GEN_TOKS = 256  # as the hf backend
SAMPLING_KWARGS = ("temperature", "top_k", "top_p", "do_sample")


def parse_mesh(mesh: Any) -> jax.sharding.Mesh | None:
    """A mesh from `mesh=`: None (FSDP over every device), a preset name (dp, fsdp, fsdp_tp),
    'DATAxFSDPxTENSOR' sizes (e.g. 2x2x2, -1 = the rest), a MeshConfig or a Mesh."""
    if mesh is None or isinstance(mesh, jax.sharding.Mesh):
        return mesh
    if isinstance(mesh, MeshConfig):
        return make_mesh(mesh)
    if isinstance(mesh, str) and mesh in MESH_PRESETS:
        return make_mesh(MESH_PRESETS[mesh])
    sizes = re.fullmatch(r"(-?\d+)x(-?\d+)x(-?\d+)", str(mesh))
    if sizes is None:
        raise ConfigError(f"mesh={mesh!r}: expected a preset ({', '.join(MESH_PRESETS)}) or "
                          "DATAxFSDPxTENSOR sizes such as 1x8x1 or 2x2x2 (-1: the remaining devices)")
    data, fsdp, tensor = (int(size) for size in sizes.groups())
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def load_checkpoint_tokenizer(checkpoint: str | os.PathLike, tokenizer: Any = None):
    """The tokenizer given (a path or a loaded tokenizer), else the checkpoint's own in any format
    (`llamax.convert.identity.checkpoint_tokenizer`: an HF/Meta folder's files, a params
    checkpoint's or run's recorded copy, else its INIT_FROM's). DataError naming both ways out."""
    from llamax.convert.identity import checkpoint_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    try:
        return checkpoint_tokenizer(checkpoint, tokenizer)
    except DataError as error:
        if tokenizer is not None:
            raise
        raise DataError(f"{error}; with lm_eval: --model_args checkpoint=...,tokenizer=PATH") from None


class LlamaxLM(TemplateLM):
    """lm-eval model args: checkpoint (required), tokenizer, batch_size (8), max_length (the
    model's context), dtype (float32 | bfloat16 | float16), weights (float32 | bfloat16 | int8:
    weight-only precision of the projections, `llamax.model.quantize`), mesh, step and base (of a run),
    max_gen_toks (256), add_bos_token, prefix_token_id, seed (0), truncate_left (False),
    check_every (16: tokens between stop-string checks)."""

    def __init__(self, checkpoint: str | None = None, tokenizer: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, dtype: str = "float32",
                 mesh: Any = None, step: int | None = None, base: str | None = None,
                 weights: str = "float32", **options: Any):
        super().__init__()
        if not checkpoint:
            raise ConfigError("the llamax model needs checkpoint=PATH (an HF or Meta folder, an orbax "
                              "params checkpoint or a training run), e.g. --model_args checkpoint=runs/tiny")
        from llamax.convert.hub import load_any
        from llamax.run_dir import checkpoint_step

        if not os.path.exists(checkpoint):
            raise CheckpointError(f"checkpoint {checkpoint} does not exist")
        # Everything that can be wrong with the arguments fails before the weights are read.
        dtype = float_dtype_name(dtype, "dtype")
        check_weights(weights)
        options = _check_options(options)
        mesh = parse_mesh(mesh)
        tokenizer = load_checkpoint_tokenizer(checkpoint, tokenizer)
        self.step = checkpoint_step(checkpoint, None if step is None else int(step))
        config, params = load_any(checkpoint, step=self.step, base=base, dtype=dtype, param_dtype=dtype)
        params, quant = quantize_weights(config, params, weights)
        self.checkpoint = str(checkpoint)
        self._setup(config, params, tokenizer, mesh, None, batch_size, max_length, quant, **options)

    @classmethod
    def from_params(cls, config: ModelConfig, params: Any, tokenizer: Any, *,
                    mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None,
                    batch_size: int = 8, max_length: int | None = None, quant: Any = None,
                    **options: Any) -> "LlamaxLM":
        """A backend over params already in memory (e.g. the training loop's, on its mesh; `quant`:
        the int8 scales of `llamax.model.quantize.quantize_weights`)."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm.checkpoint, lm.step = None, None
        lm._setup(config, params, tokenizer, mesh, rules, batch_size, max_length, quant, **_check_options(options))
        return lm

    def _setup(self, config: ModelConfig, params: Any, tokenizer: Any, mesh, rules, batch_size,
               max_length, quant, *, max_gen_toks=DEFAULT_MAX_GEN_TOKS, add_bos_token=None,
               prefix_token_id=None, seed=0, truncate_left=False, check_every=16) -> None:
        from llamax.tokenizer import check_vocab

        check_vocab(tokenizer, config.vocab_size)
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ConfigError(f"batch_size={batch_size!r}: the llamax backend takes a fixed integer "
                              "batch size (requests are padded into a few compiled shapes)")
        max_length = int(max_length or config.max_position_embeddings)
        if not 1 < max_length <= config.max_position_embeddings:
            raise ConfigError(f"max_length={max_length} must be in [2, max_position_embeddings="
                              f"{config.max_position_embeddings}]")
        self.config, self.tokenizer = config, tokenizer
        self.scorer = SequenceScorer(config, mesh, rules, int(batch_size), max_length)
        self.mesh, self.rules = self.scorer.mesh, self.scorer.rules
        self.params = self.scorer.place(params)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.quant = None if quant is None else jax.device_put(quant, replicated)  # int8 scales
        self._max_length, self._max_gen_toks = max_length, int(max_gen_toks)
        self._batch_size = int(batch_size)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.seed, self.truncate_left, self.check_every = int(seed), bool(truncate_left), int(check_every)
        self._rank, self._world_size = jax.process_index(), jax.process_count()
        self._calls = 0  # generation batches so far: each samples with its own seed

    # ---- what lm-eval reads -------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """Conditions empty contexts and the first rolling window: BOS, else EOS (as hf)."""
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "path", type(self.tokenizer).__name__)).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.config.num_params(), "model_dtype": self.config.dtype,
                "checkpoint": self.checkpoint, "step": self.step}

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.effective_chat_template() if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- tokens -------------------------------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Like the hf backend: BOS as the tokenizer adds it (or `add_bos_token`), none when the
        text already starts with it; special tokens spelled in the text are parsed."""
        bos = add_special_tokens
        if bos is None:
            starts_with_bos = string.startswith(self.tok_decode([self.prefix_token_id], skip_special_tokens=False))
            bos = False if starts_with_bos else self.add_bos_token is not False
        return self.tokenizer.encode(string, bos=bool(bos), allow_special=True)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special=skip_special_tokens)

    # ---- requests -----------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation) or None, context tokens, continuation tokens)]."""
        pairs = []
        for strings, context, continuation in requests:
            length = len(context) + len(continuation)
            if length > self.max_length + 1:
                if not self.truncate_left or len(continuation) > self.max_length:
                    raise DataError(_too_long("context + continuation", strings, length,
                                              f"max_length + 1 = {self.max_length + 1}"))
                context = context[length - self.max_length - 1:]  # as the hf backend cuts it
            pairs.append((list(context), list(continuation)))
        everyone = _allgather_objects(pairs)  # every process scores the union
        start = sum(len(part) for part in everyone[:self.rank])
        results = self.scorer.score(self.params, [pair for part in everyone for pair in part], self.quant)
        return results[start:start + len(pairs)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total loglikelihood, scored in windows exactly as lm-eval's hf backend."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations up to the first stop sequence (the EOS text included) or max_gen_toks."""
        local = [(self.tok_encode(context), gen_kwargs) for context, gen_kwargs in (r.args for r in requests)]
        everyone = _allgather_objects(local)
        start = sum(len(part) for part in everyone[:self.rank])
        union = [item for part in everyone for item in part]
        groups: dict[str, list[int]] = {}  # requests with the same kwargs share batches
        for index, (_, gen_kwargs) in enumerate(union):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(index)
        texts: list[str | None] = [None] * len(union)
        for indices in groups.values():
            self._generate_group(union, indices, texts)
        answers = texts[start:start + len(requests)]
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", request.args, answer)
        return answers

    def _generate_group(self, union: list, indices: list[int], texts: list) -> None:
        kwargs = normalize_gen_kwargs(union[indices[0]][1], self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None),
                                      eos=self.tok_decode([self.eot_token_id], skip_special_tokens=False))
        max_gen_toks = kwargs.pop("max_gen_toks")
        unsupported = sorted(set(kwargs) - set(SAMPLING_KWARGS))
        if unsupported:
            raise ConfigError(f"generation kwargs {unsupported} are not supported by the llamax backend "
                              f"(it takes until, max_gen_toks and {', '.join(SAMPLING_KWARGS)})")
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        limit = self.max_length - max_gen_toks
        if limit < 1:
            raise ConfigError(f"max_gen_toks={max_gen_toks} leaves no room for a context in "
                              f"max_length={self.max_length}")
        prompts = {}
        for index in indices:
            tokens = union[index][0]
            if len(tokens) > limit and not self.truncate_left:
                raise DataError(_too_long("generation context", (self.tok_decode(tokens), ""), len(tokens),
                                          f"max_length - max_gen_toks = {limit}"))
            prompts[index] = tokens[-limit:]
        order = sorted(indices, key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        for begin in range(0, len(order), self.batch_size):
            batch = order[begin:begin + self.batch_size]
            new_tokens = generate(
                self.config, self.params, [prompts[i] for i in batch], max_gen_toks,
                temperature=temperature, top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"),
                seed=self.seed + self._calls, stop_ids=self.tokenizer.stop_ids, mesh=self.mesh,
                rules=self.rules, check_every=self.check_every, quant=self.quant,
                stop=lambda _, tokens: any(s and s in self.tok_decode(tokens) for s in until))
            self._calls += 1
            for index, tokens in zip(batch, new_tokens):
                texts[index] = postprocess_generated_text(self.tok_decode(tokens), until, None)

    # ---- several processes --------------------------------------------------------------

    def all_gather(self, tensor):
        """lm-eval gathers request counts (torch tensors) to pad every rank to the same count."""
        if self.world_size == 1:
            return tensor
        import torch

        values = _allgather_objects(np.asarray(tensor.cpu()).reshape(-1))
        return torch.as_tensor(np.concatenate(values))

    def gather_object(self, obj, dst=0):
        gathered = _allgather_objects(obj)
        return gathered if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("llamax lm_eval barrier")


def _check_options(options: dict) -> dict:
    """The optional model args; ConfigError naming the valid ones for anything else. lm-eval's
    own `device` and `max_batch_size` are accepted and ignored (placement is the mesh's)."""
    known = {"max_gen_toks", "add_bos_token", "prefix_token_id", "seed", "truncate_left", "check_every"}
    options = {k: v for k, v in options.items() if k not in ("device", "max_batch_size")}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown llamax model args {unknown}; valid: checkpoint, tokenizer, batch_size, "
                          f"max_length, dtype, mesh, step, base, weights, {', '.join(sorted(known))}")
    return options


def _too_long(what: str, strings: tuple | None, length: int, limit: str) -> str:
    context = "" if strings is None else f" (context starting {strings[0][:60]!r})"
    return (f"a request's {what} has {length} tokens{context}, more than {limit}. Raise max_length (up "
            "to the model's max_position_embeddings), use fewer few-shot examples, or pass "
            "truncate_left=True to cut contexts from the left as the hf backend does")


def _allgather_objects(obj: Any) -> list[Any]:
    """[obj of process 0, obj of process 1, ...] on every process ([obj] with one process)."""
    if jax.process_count() == 1:
        return [obj]
    import pickle

    from jax.experimental import multihost_utils

    payload = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = multihost_utils.process_allgather(np.int64(payload.size))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [processes, max size]
    return [pickle.loads(row[:size].tobytes()) for row, size in zip(gathered, sizes)]
