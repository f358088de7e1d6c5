"""The engine: add_request / step / abort over scheduler, runner, sampler and detokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lepton.block_manager import KVCacheManager
from lepton.chat import ChatPrompt
from lepton.config import EngineConfig
from lepton.detokenizer import IncrementalDetokenizer
from lepton.errors import ConfigError, InvalidRequest
from lepton.runners import make_runner, open_folder
from lepton.isolation import run_isolated, sample_isolated
from lepton.sampler import SamplingInput, make_generator
from lepton.sampling_params import SamplingParams
from lepton.scheduler import Scheduler
from lepton.sequence import FinishReason, Sequence
from lepton.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step produced for one request; text and token_ids are the new part only."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_input_tokens: int
    num_output_tokens: int
    logprobs: list = field(default_factory=list)  # per new token: [(id, logprob), ...] when asked
    error: Exception | None = None  # set when the request failed (finish_reason ERROR)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics; counters only grow."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int
    prompt_tokens: int  # prompt tokens of admitted requests
    generated_tokens: int
    computed_tokens: int  # tokens run through the model (prefix-cache hits are not computed)


@dataclass(frozen=True)
class PreparedRequest:
    """A request tokenized and checked against the model's limits, ready to queue (any thread)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(eq=False)
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    generator: object  # torch.Generator, or None when greedy
    stop_token_ids: frozenset[int]  # NOTE: built once, so each step's check is O(1)
    banned_token_ids: tuple[int, ...]  # eos and stop ids in the vocab, masked before min_tokens


class LLMEngine:
    """A model, its KV cache and a scheduler; driven by one thread calling step()."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        folder = open_folder(config)
        self.tokenizer = Tokenizer.from_folder(folder)
        self.runner = make_runner(folder, config)
        self.runner.transient_logits = True  # NOTE: each step's logits are sampled before the next step runs
        model_len = self.runner.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        self.kv_cache = KVCacheManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        if self.runner.num_blocks * config.cache.block_size < self.max_model_len:
            raise ConfigError(
                f"kv_cache_memory_bytes: {self.runner.num_blocks} blocks cannot hold one sequence "
                f"of max_model_len {self.max_model_len}; raise it or lower max_model_len"
            )
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self._requests: dict[str, _Request] = {}
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._computed_tokens = 0

    def prepare(
        self, request_id: str, prompt: str | list[int] | ChatPrompt, params: SamplingParams
    ) -> PreparedRequest:
        """Tokenize (a conversation: render its chat template first) and check against the model's
        limits; safe to call from any thread."""
        # NOTE: the tokenizer releases the GIL, so a long prompt tokenized here does not stall the
        # engine thread's steps.
        if isinstance(prompt, ChatPrompt):
            token_ids = self.tokenizer.encode_chat(prompt)
        else:
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        field = ("messages" if isinstance(prompt, ChatPrompt) else "text_input" if isinstance(prompt, str)
                 else "input_ids")
        if not token_ids or (isinstance(prompt, str) and not prompt.strip()):
            raise InvalidRequest(field, "the prompt is empty")
        vocab = self.runner.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidRequest(field, f"token ids must be in [0, {vocab}) (the model's vocabulary)")
        self.config.limits.check(params)  # NOTE: the served path checked them already; in-process callers too
        max_prompt_tokens = self.config.limits.max_prompt_tokens
        if max_prompt_tokens and len(token_ids) > max_prompt_tokens:
            raise InvalidRequest(field, f"{len(token_ids)} tokens, at most {max_prompt_tokens} (max_prompt_tokens)")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequest(field, f"{len(token_ids)} tokens; the model's context is {self.max_model_len} "
                                        "tokens, prompt and max_tokens together")
        if len(token_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                "max_tokens",
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.max_model_len} tokens",
            )
        return PreparedRequest(request_id, token_ids, params)

    def add_prepared(self, request: PreparedRequest) -> int:
        """Queue a prepared request (engine thread); returns the prompt's token count."""
        request_id, token_ids, params = request.request_id, request.prompt_token_ids, request.params
        if request_id in self._requests:
            raise InvalidRequest("request_id", f"{request_id!r} is already running")
        seq = Sequence(request_id, token_ids, params, max_total_tokens=self.max_model_len)
        detok = IncrementalDetokenizer(
            self.tokenizer.backend, token_ids, skip_special_tokens=params.skip_special_tokens,
            stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
        )
        generator = None if params.greedy else make_generator(params.seed)
        stop_ids = frozenset(params.stop_token_ids)
        vocab = self.runner.model_config.vocab_size
        banned = tuple(sorted(t for t in stop_ids | self.tokenizer.eos_token_ids if t < vocab))
        self.scheduler.add(seq)  # raises ServerBusy when the queue is full
        self._requests[request_id] = _Request(seq, detok, generator, stop_ids, banned)
        self._prompt_tokens += len(token_ids)
        return len(token_ids)

    def add_request(self, request_id: str, prompt: str | list[int] | ChatPrompt, params: SamplingParams) -> int:
        """prepare() then add_prepared(), on the calling thread; returns the prompt's token count."""
        return self.add_prepared(self.prepare(request_id, prompt, params))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks at once; None if it is not known."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req.seq, FinishReason.CANCELLED)
        return self._output(req, "", [], FinishReason.CANCELLED)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def stats(self) -> EngineStats:
        kv = self.kv_cache
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=kv.num_used_blocks, kv_blocks_total=kv.num_blocks,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self._prompt_tokens, generated_tokens=self._generated_tokens,
            computed_tokens=self._computed_tokens,
        )

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample; one output per request that got a token or failed.

        A request whose model run, sampling or detokenization fails is finished with its own error
        (RequestOutput.error); the others in the step go on.
        """
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        errors: dict[str, Exception] = {}
        try:
            rids, logits, errors = run_isolated(self.runner, sched, self.config.cache.block_size)
            # NOTE: K/V a failed run should have written are garbage: its new cache entries go.
            for rid in errors:
                self.kv_cache.forget_pending(rid)
            rows = [self._sampling_input(self._requests[rid]) for rid in rids]
            sampled, logprobs = sample_isolated(logits, rids, rows, errors)
            outputs = [self._fail(rid, exc) for rid, exc in errors.items()]
            self.scheduler.update(sched, sampled)
        except Exception as exc:  # NOTE: a defect of the step itself: fail its requests, not the server
            logger.exception("engine step failed")
            self.kv_cache.discard_pending()
            return [self._fail(item.seq.request_id, exc) for item in sched.scheduled]
        self._generated_tokens += len(sampled)
        self._computed_tokens += sched.num_batched_tokens
        for rid, token_id in sampled.items():
            try:
                outputs.append(self._after_token(self._requests[rid], token_id, logprobs.get(rid)))
            except Exception as exc:  # NOTE: e.g. detokenization: this request alone fails
                logger.exception("finishing the step of %s failed", rid)
                outputs.append(self._fail(rid, exc))
        return outputs

    def _fail(self, request_id: str, error: Exception) -> RequestOutput:
        """Finish request_id with error and free its blocks (if it still holds any)."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return RequestOutput(request_id, "", [], True, FinishReason.ERROR, 0, 0, error=error)
        self.scheduler.finish(req.seq, FinishReason.ERROR)
        output = self._output(req, "", [], FinishReason.ERROR)
        output.error = error
        return output

    def _sampling_input(self, req: _Request) -> SamplingInput:
        seq = req.seq
        return SamplingInput(
            params=seq.params, prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=seq.output_token_ids, generator=req.generator,
            eos_token_ids=self.tokenizer.eos_token_ids, banned_token_ids=req.banned_token_ids,
        )

    def _after_token(self, req: _Request, token_id: int, logprobs) -> RequestOutput:
        seq = req.seq
        text = req.detokenizer.add_tokens([token_id])
        reason = self._finish_reason(req, token_id)
        if reason is not None:
            if req.detokenizer.stopped_by is None:
                text += req.detokenizer.flush()
            self.scheduler.finish(seq, reason)
            del self._requests[seq.request_id]
        return self._output(req, text, [token_id], reason, [logprobs] if logprobs else [])

    def _finish_reason(self, req: _Request, token_id: int) -> FinishReason | None:
        seq, params = req.seq, req.seq.params
        if req.detokenizer.stopped_by is not None:
            return FinishReason.STOP
        if seq.num_output_tokens >= params.min_tokens:
            if token_id in req.stop_token_ids:
                return FinishReason.STOP
            if not params.ignore_eos and token_id in self.tokenizer.eos_token_ids:
                return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= seq.max_total_tokens:
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _output(req: _Request, text: str, token_ids: list[int], reason, logprobs=()) -> RequestOutput:
        return RequestOutput(
            request_id=req.seq.request_id, text=text, token_ids=token_ids,
            finished=reason is not None, finish_reason=reason,
            num_input_tokens=req.seq.num_prompt_tokens,
            num_output_tokens=req.seq.num_output_tokens, logprobs=list(logprobs),
        )
