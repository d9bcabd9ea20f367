"""LoopLM: a transformer whose middle block is applied `depth` times, depth chosen per call.

    tokens -> embed (+ learned positions) -> prelude layers -> e
    h_0 = e (no injection) or 0 (injection)
    h_t = Phi(h_{t-1}),  Phi(h) = [loop norm] o block_layers o inject(h, e)        for t = 1..depth
    logits_t = lm_head(final_norm(coda(h_t)))   (with loop_norm the final norm is inside Phi)

`forward_depths` reads logits out after every requested step of ONE pass, which is what makes a
16-depth accuracy curve cost about one depth-16 pass. Generation keeps one KV slot per (loop step,
layer), so the prefill of depth k is exactly the first k steps of a deeper prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from stars.model.config import LoopLMConfig
from stars.model.layers import AttentionContext, KVSlot, LoopLayer, rotary_cos_sin
from stars.model.norms import Norm


def check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth={depth!r} must be an integer >= 1 (the number of loop steps)")
    return depth


@dataclass
class LoopCache:
    """KV cache of a LoopLM: one slot per prelude layer, per (loop step, block layer), per coda layer."""

    prelude: list[KVSlot]
    loop: list[list[KVSlot]]
    coda: list[KVSlot]
    length: int = 0  # tokens cached so far

    @classmethod
    def empty(cls, config: LoopLMConfig, depth: int) -> LoopCache:
        return cls(
            prelude=[KVSlot() for _ in range(config.n_prelude)],
            loop=[[KVSlot() for _ in range(config.n_block)] for _ in range(depth)],
            coda=[KVSlot() for _ in range(config.n_coda)],
        )

    def slots(self) -> list[KVSlot]:
        return [*self.prelude, *(slot for step in self.loop for slot in step), *self.coda]

    def reserve(self, capacity: int) -> LoopCache:
        """Preallocate every slot for `capacity` tokens (`KVSlot.reserve`): decoding then writes in place."""
        for slot in self.slots():
            slot.reserve(capacity)
        return self

    def share_first_steps(self, depth: int, coda: list[KVSlot]) -> LoopCache:
        """A cache for `depth` that shares this cache's prelude and first `depth` loop steps."""

        def copy(slots):
            return [KVSlot(s.k, s.v) for s in slots]

        return LoopCache(copy(self.prelude), [copy(step) for step in self.loop[:depth]], coda, self.length)


@dataclass
class LoopRun:
    """The state of one pass through the loop, enough to apply Phi once more (for JSRR)."""

    h: torch.Tensor  # hidden state after the last loop step [B, T, d]
    e: torch.Tensor  # loop input (prelude output) [B, T, d]
    ctx: AttentionContext
    depth: int
    states: list[torch.Tensor] | None = None  # h_1 .. h_depth, when `run_loop(keep_states=True)`


@dataclass
class DepthReadout:
    """Logits after each requested loop step of one pass, plus the trajectory diagnostics.

    Diagnostics are means over real tokens of per-token L2 norms: `hidden_norm` ||h_t||,
    `step_size` ||h_t - h_{t-1}||, `dist_from_start` ||h_t - h_0||.
    """

    depths: list[int]
    logits: list[torch.Tensor]
    hidden_norm: torch.Tensor
    step_size: torch.Tensor
    dist_from_start: torch.Tensor
    states: torch.Tensor | None = None  # [n_depths, B, T, d] when asked for
    initial_state: torch.Tensor | None = None  # h_0 [B, T, d] when states were asked for
    # Exit probabilities p_1 .. p_max(depths) [max_depth, B, T] with the last requested depth as the
    # horizon, for a model with an exit gate (`LoopLM.exit_probabilities`); None otherwise.
    exit_probs: torch.Tensor | None = None
    _index: dict[int, int] = field(default_factory=dict, repr=False)

    def logits_at(self, depth: int) -> torch.Tensor:
        return self.logits[self._index[depth]]


@dataclass
class LoopLMOutput(CausalLMOutputWithPast):
    """`forward`'s output: transformers' causal-LM fields plus, for a model with an exit gate, the
    exit probabilities of this pass's loop steps [depth, B, T] (`LoopLM.exit_probabilities`)."""

    exit_probs: torch.Tensor | None = None


class LoopLM(PreTrainedModel):
    config_class = LoopLMConfig
    base_model_prefix = "looplm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: LoopLMConfig):
        super().__init__(config)
        d = config.d_model
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_positions = (
            nn.Embedding(config.max_position_embeddings, d) if config.positions == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.prelude = nn.ModuleList(LoopLayer(config) for _ in range(config.n_prelude))
        self.injection = nn.Linear(2 * d, d, bias=False) if config.injection == "linear" else None
        self.block = nn.ModuleList(LoopLayer(config) for _ in range(config.n_block))
        self.coda = nn.ModuleList(LoopLayer(config) for _ in range(config.n_coda))
        self.norm = Norm(d, config.norm_type, config.norm_eps)
        # Tying reuses the embedding matrix in `_logits`, so there is no second parameter to keep tied.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.exit_gate = nn.Linear(d, 1) if config.exit_gate else None
        self.gradient_checkpointing = False
        self.post_init()

    # ---- transformers plumbing -------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.embed_init_std)
        elif isinstance(module, Norm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Recompute each loop step in the backward pass (memory ~ one step instead of `depth`)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def block_parameters(self) -> list[nn.Parameter]:
        """Parameters of Phi, the map the loop iterates (what the JSRR penalty regularises)."""
        params = [p for layer in self.block for p in layer.parameters()]
        if self.injection is not None:
            params += list(self.injection.parameters())
        if self.config.loop_norm:
            params += list(self.norm.parameters())
        return params

    # ---- the pieces of a pass ----------------------------------------------------------------------
    def _context(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past_length: int = 0
    ) -> AttentionContext:
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            position_ids = torch.arange(past_length, past_length + T, device=device).expand(B, T)
            attn_mask = None
            if past_length:
                attn_mask = torch.ones(B, 1, T, past_length + T, dtype=torch.bool, device=device)
            token_mask = None
        else:
            if attention_mask.shape != (B, past_length + T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                    f"({B}, {past_length + T}) = (batch, cached + new tokens)"
                )
            keys = attention_mask.bool()
            position_ids = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:]
            q_idx = torch.arange(past_length, past_length + T, device=device)[:, None]
            k_idx = torch.arange(past_length + T, device=device)[None, :]
            # A left-padding query has no real key before it; letting it see itself keeps SDPA from
            # producing NaN rows. Its output is never read.
            attn_mask = ((k_idx <= q_idx) & keys[:, None, None, :]) | (k_idx == q_idx)
            token_mask = keys[:, past_length:]
        if self.embed_positions is not None and int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond max_position_embeddings="
                f"{self.config.max_position_embeddings} of this model's learned positions"
            )
        rope = None
        if self.config.positions == "rope":
            rope = rotary_cos_sin(
                position_ids, self.config.head_dim, self.config.rope_theta, self.embed_tokens.weight.dtype
            )
        return AttentionContext(attn_mask, position_ids, rope, token_mask)

    def _embed(self, input_ids: torch.Tensor, ctx: AttentionContext, cache: LoopCache | None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            x = x + self.embed_positions(ctx.position_ids)
        x = self.drop(x)
        for i, layer in enumerate(self.prelude):
            x = layer(x, ctx, cache.prelude[i] if cache else None)
        return x

    def _initial_state(self, e: torch.Tensor) -> torch.Tensor:
        return e if self.config.injection == "none" else torch.zeros_like(e)

    def _step(
        self, h: torch.Tensor, e: torch.Tensor, ctx: AttentionContext, slots: Sequence[KVSlot] | None = None
    ) -> torch.Tensor:
        """Phi: one application of the shared block (with input injection and loop norm)."""
        if self.config.injection == "add":
            h = h + e
        elif self.config.injection == "linear":
            h = self.injection(torch.cat([h, e], dim=-1))
        for i, layer in enumerate(self.block):
            h = layer(h, ctx, slots[i] if slots else None)
        if self.config.loop_norm:
            h = self.norm(h)
        return h

    def _coda(self, h: torch.Tensor, ctx: AttentionContext, slots: Sequence[KVSlot] | None = None):
        for i, layer in enumerate(self.coda):
            h = layer(h, ctx, slots[i] if slots else None)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm (unless it already ran inside Phi) and the LM head."""
        if not self.config.loop_norm:
            h = self.norm(h)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    def _logits(self, h: torch.Tensor, ctx: AttentionContext, coda: Sequence[KVSlot] | None = None):
        return self._head(self._coda(h, ctx, coda))

    def _apply_step(self, h, e, ctx, t: int, cache: LoopCache | None = None) -> torch.Tensor:
        """Loop step t (1-based), with its KV slots when generating."""
        if self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled():
            return checkpoint(self._step, h, e, ctx, use_reentrant=False)
        return self._step(h, e, ctx, cache.loop[t - 1] if cache else None)

    def _advance(self, h, e, ctx, first: int, last: int, cache: LoopCache | None = None) -> torch.Tensor:
        for t in range(first, last + 1):
            h = self._apply_step(h, e, ctx, t, cache)
        return h

    # ---- public API ---------------------------------------------------------------------------------
    def run_loop(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        depth: int,
        backprop_depth: int | None = None,
        keep_states: bool = False,
    ) -> LoopRun:
        """Embed and loop `depth` times. With `backprop_depth=k` only the last k steps keep a graph
        (Huginn's truncated backpropagation). `keep_states` keeps every step's state (for per-step
        logits or exit probabilities)."""
        check_depth(depth)
        ctx = self._context(input_ids, attention_mask)
        e = self._embed(input_ids, ctx, None)
        h = self._initial_state(e)
        no_grad_steps = 0 if backprop_depth is None else max(depth - check_depth(backprop_depth), 0)
        states: list[torch.Tensor] | None = [] if keep_states else None
        for t in range(1, depth + 1):
            if t <= no_grad_steps:
                with torch.no_grad():
                    h = self._apply_step(h, e, ctx, t).detach()
            else:
                h = self._apply_step(h, e, ctx, t)
            if states is not None:
                states.append(h)
        return LoopRun(h=h, e=e, ctx=ctx, depth=depth, states=states)

    def kv_cache_bytes_per_token(self, depth: int) -> int:
        """Bytes of KV cache one token takes at `depth`: keys and values of every prelude layer, of
        every block layer at each of the `depth` loop steps, and of every coda layer."""
        c = self.config
        layers = c.n_prelude + depth * c.n_block + c.n_coda
        return 2 * layers * c.n_kv_heads * c.head_dim * self.embed_tokens.weight.element_size()

    def exit_probabilities(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Ouro's exit distribution over the loop steps of one pass, [len(states), B, T].

        lambda_t = sigmoid(gate(h_t)) is the chance to stop at step t given that no earlier step did:
        p_t = lambda_t * prod_{j<t} (1 - lambda_j), and the last step takes the rest, so the p_t sum
        to 1 per token (docs/science.md, section 6). Computed in float32."""
        if self.exit_gate is None:
            raise ValueError("this model has no exit gate (LoopLMConfig.exit_gate is false)")
        if not states:
            raise ValueError("exit_probabilities needs the state of at least one loop step")
        lam = torch.sigmoid(torch.stack([self.exit_gate(h).squeeze(-1) for h in states]).float())
        survive = torch.cumprod(1.0 - lam, dim=0)  # prod_{j<=t} (1 - lambda_j)
        before = torch.cat([torch.ones_like(survive[:1]), survive[:-1]])  # prod_{j<t}
        probs = lam * before
        return torch.cat([probs[:-1], before[-1:]])  # the last step: all the mass not yet spent

    def logits_of(self, run: LoopRun) -> torch.Tensor:
        return self._logits(run.h, run.ctx)

    def block_fn(self, run: LoopRun, rows: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """Phi at this run's masks/positions as a function of h alone, for Jacobian products.

        The loop input e is detached: the JSRR penalty must reach only Phi's own parameters.
        `rows` restricts it to a subset of the batch's sequences.
        """
        e, ctx = run.e.detach(), run.ctx
        if rows is not None:
            e, ctx = e.index_select(0, rows), ctx.select(rows)
        return lambda h: self._step(h, e, ctx)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        depth: int | None = None,
        past_key_values: LoopCache | None = None,
        use_cache: bool = False,
        backprop_depth: int | None = None,
        **kwargs,
    ) -> LoopLMOutput:
        """Logits (and the shifted next-token loss when `labels` are given) at `depth` loop steps,
        and the exit probabilities when the model has an exit gate."""
        depth = check_depth(self.config.default_depth if depth is None else depth)
        if past_key_values is not None or use_cache:
            cache = past_key_values or LoopCache.empty(self.config, depth)
            if len(cache.loop) < depth:
                raise ValueError(f"this cache holds {len(cache.loop)} loop steps; depth {depth} needs more")
            logits = self._cached_pass(input_ids, attention_mask, cache, depth)
            return LoopLMOutput(logits=logits, past_key_values=cache)
        gated = self.exit_gate is not None
        run = self.run_loop(input_ids, attention_mask, depth=depth, backprop_depth=backprop_depth, keep_states=gated)
        logits = self.logits_of(run)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        exit_probs = self.exit_probabilities(run.states) if gated else None
        return LoopLMOutput(loss=loss, logits=logits, exit_probs=exit_probs)

    @torch.no_grad()
    def forward_depths(
        self,
        input_ids: torch.Tensor,
        depths: Iterable[int] = range(1, 17),
        attention_mask: torch.Tensor | None = None,
        return_states: bool = False,
    ) -> DepthReadout:
        """Logits at every requested depth from ONE pass through the loop, plus diagnostics."""
        depths = sorted({check_depth(int(k)) for k in depths})
        if not depths:
            raise ValueError("depths is empty; give at least one depth >= 1")
        wanted = set(depths)
        ctx = self._context(input_ids, attention_mask)
        e = self._embed(input_ids, ctx, None)
        h0 = h = self._initial_state(e)
        weights = _token_weights(ctx.token_mask, input_ids.shape, h.dtype, h.device)
        logits, states, norm, step, dist, gated = [], [], [], [], [], []
        prev = h
        for t in range(1, depths[-1] + 1):
            h = self._apply_step(h, e, ctx, t)
            if self.exit_gate is not None:
                gated.append(h)
            if t in wanted:
                logits.append(self._logits(h, ctx))
                norm.append(_mean_token_norm(h, weights))
                step.append(_mean_token_norm(h - prev, weights))
                dist.append(_mean_token_norm(h - h0, weights))
                if return_states:
                    states.append(h)
            prev = h
        return DepthReadout(
            depths=depths,
            logits=logits,
            hidden_norm=torch.stack(norm),
            step_size=torch.stack(step),
            dist_from_start=torch.stack(dist),
            states=torch.stack(states) if return_states else None,
            initial_state=h0 if return_states else None,
            exit_probs=self.exit_probabilities(gated) if gated else None,
            _index={k: i for i, k in enumerate(depths)},
        )

    # ---- generation -------------------------------------------------------------------------------------
    def _cached_pass(self, input_ids, attention_mask, cache: LoopCache, depth: int) -> torch.Tensor:
        ctx = self._context(input_ids, attention_mask, past_length=cache.length)
        e = self._embed(input_ids, ctx, cache)
        h = self._initial_state(e)
        h = self._advance(h, e, ctx, 1, depth, cache)
        cache.length += input_ids.shape[1]
        return self._logits(h, ctx, cache.coda)

    @torch.no_grad()
    def generate_greedy(
        self,
        input_ids: torch.Tensor,
        depth: int,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding at `depth` with a KV cache per (loop step, layer).

        Prompts in a batch are LEFT-padded (`attention_mask` 0 on the left). Returns the new tokens
        [B, max_new_tokens]; after a row's EOS the rest of the row is `pad_token_id`.
        """
        return self.generate_greedy_depths(input_ids, [depth], max_new_tokens, attention_mask, eos_token_id)[
            check_depth(depth)
        ]

    @torch.no_grad()
    def generate_greedy_depths(
        self,
        input_ids: torch.Tensor,
        depths: Iterable[int],
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | None = None,
    ) -> dict[int, torch.Tensor]:
        """Greedy decoding at several depths sharing ONE prefill of the prompt.

        The prompt is prefilled once to the deepest depth; the cache of depth k is the prelude plus
        the first k loop steps of that prefill (plus its own coda), so each depth then decodes alone.
        Token for token equal to separate `generate_greedy` calls.
        """
        depths = sorted({check_depth(int(k)) for k in depths})
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        B = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Prefill once to the deepest depth, reading out (with a depth-specific coda) at each depth.
        ctx = self._context(input_ids, attention_mask)
        full = LoopCache.empty(self.config, depths[-1])
        e = self._embed(input_ids, ctx, full)
        h = self._initial_state(e)
        first_logits: dict[int, torch.Tensor] = {}
        codas: dict[int, list[KVSlot]] = {}
        for t in range(1, depths[-1] + 1):
            h = self._apply_step(h, e, ctx, t, full)
            if t in depths:
                codas[t] = [KVSlot() for _ in self.coda]
                # Coda layers see every prompt position (and fill their cache); the head only the last.
                first_logits[t] = self._head(self._coda(h, ctx, codas[t])[:, -1:])
        full.length = input_ids.shape[1]
        results = {}
        for k in depths:
            # Depths decode one after another: one depth's cache (prompt + new tokens) at a time, in
            # buffers of its own, so the shared prefill is never written to.
            cache = full.share_first_steps(k, codas[k])
            if max_new_tokens > 1:
                cache.reserve(input_ids.shape[1] + max_new_tokens - 1)
            results[k] = self._decode(cache, first_logits[k], attention_mask, k, max_new_tokens, eos, pad, B)
        return results

    def _decode(self, cache, logits, attention_mask, depth, max_new_tokens, eos, pad, B) -> torch.Tensor:
        out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=attention_mask.device)
        done = torch.zeros(B, dtype=torch.bool, device=attention_mask.device)
        mask = attention_mask
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out[:, i] = nxt
            if eos is not None:
                done |= nxt == eos
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
            logits = self._cached_pass(nxt[:, None], mask, cache, depth)
        return out


def _token_weights(token_mask, shape, dtype, device) -> torch.Tensor:
    if token_mask is None:
        return torch.full(shape, 1.0 / (shape[0] * shape[1]), dtype=dtype, device=device)
    w = token_mask.to(dtype)
    return w / w.sum().clamp(min=1)


def _mean_token_norm(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (x.float().norm(dim=-1) * weights).sum()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t+1]; -100 is ignored."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
