"""A compact MoEUT baseline for the LM comparison (issue 15): SwitchHead attention, σ-MoE MLP, layer grouping and
peri-layernorm, as a transformers `PreTrainedModel` trained from scratch by `frontier_sweep.py`.

MoEUT (Csordás, Irie, Schmidhuber, Potts and Manning, 2024, "MoEUT: Mixture-of-Experts Universal Transformers")
builds a shared-layer ("universal") transformer out of two mixture-of-experts blocks. This module writes them down
from the papers' equations; for one layer with input x (a token's residual stream, width d):

- **Peri-layernorm**: a LayerNorm only in front of the projections that feed a softmax or a sigmoid (queries, keys
  and every router); values and the MLP's up-projection read the un-normalised residual x. One final LayerNorm
  before the LM head.
- **SwitchHead attention** (Csordás et al., 2023): H heads; per head h the query and key projections are dense,
  the value and output projections are each a mixture of E_A experts. With n = LN_1(x):
  s_V[h] = σ(n W_SV[h]), s_O[h] = σ(n W_SO[h]) (sigmoid gates, no softmax), V_h(x) = Σ_{e ∈ topk(s_V[h])}
  s_V[h, e] x W_V[h, e], attention A_h = softmax(RoPE(n W_Q[h]) · RoPE(n W_K[h])ᵀ / √d_head + causal mask) V_h,
  and the output y = Σ_h Σ_{e ∈ topk(s_O[h])} s_O[h, e] A_h W_O[h, e] (the output gates are the query token's,
  the value gates the key token's). x ← x + y.
- **σ-MoE MLP** (Csordás et al., 2023): N_E experts of width m; s = σ(LN_2(x) W_S), y = Σ_{e ∈ topk(s)} s[e]
  ReLU(x W_1[e]) W_2[e]. x ← x + y.
- **Layer grouping**: G = `group_size` distinct layers applied `num_hidden_layers / G` times in sequence (layer i
  uses the weights of distinct layer i mod G), as MoEUT's "layer groups".
- **Entropy balance loss**: for every router r (the MLP's, and each head's value and output router) p_r = the mean
  over the batch, the positions and every application of the shared layer of softmax(router logits); the loss is
  Σ_e p_r[e] log p_r[e] (the negative entropy), summed over the distinct layers, weighted by
  `mlp_entropy_coef` (MLP) and `attention_entropy_coef` (attention, mean over heads, value plus output).
  `forward` returns it, already weighted, as `aux_loss`; with `labels` it is added to the loss.
- **Initialisation** (MoEUT's scheme): every matrix N(0, s²/fan_in) with s = √(2 / num_hidden_layers), the output
  projections' fan-in being the full H·d_head (attention) and N_E·m (MLP); embeddings N(0, 1/d); LayerNorms 1 and 0.

Departures from the paper and its public code (github.com/RobertCsordas/moeut), all deliberate:
- no Triton CVMM kernel. Two readable implementations, equal up to rounding (`expert_implementation`):
  `"gathered"`: the (row, expert) pairs are sorted by expert, padded to the busiest expert and multiplied in one
  `torch.bmm` (`expert_matmul`; one host sync per expert block for the largest load; the padding is computed);
  `"dense"` (the default, what the sweep trains): every expert is computed and the unselected ones are weighted 0,
  two matmuls per block. At the comparison's CPU sizes the dense one is several times faster (sort, scatter and
  gather dominate the small products), at the cost of executing all experts' FLOPs: its tokens/s are those of the
  dense computation, while the comparisons report the analytic *active* FLOPs for every model
  (`baseline_flops.moeut_flops_per_token`);
- positions: RoPE on half of each head's channels (the public code's `SwitchHeadRope`, `rotate_fraction=0.5`), not
  the Transformer-XL relative positions of the paper's main results;
- the entropy loss averages the router distribution over the batch *and* the positions before taking the entropy
  (the public code averages over positions per sequence and takes the mean of the per-sequence negative entropies);
  the issue's definition, shared with UoE's `router_balance_loss="entropy"`;
- no dropout and no expert dropout (the comparison trains every model without dropout);
- the LM head has no bias and the router rows are not re-normalised after the random init;
- no KV cache and no padding mask: the model is trained and evaluated on full causal blocks only (`attention_mask`
  other than None raises), and `GenerationMixin` is not provided.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast


class MoEUTConfig(PretrainedConfig):
    """Configuration of `MoEUTForCausalLM`; see the module docstring for what each size means."""

    model_type = "moeut_baseline"

    def __init__(
        self,
        vocab_size: int = 2048,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        group_size: int = 2,
        num_attention_heads: int = 4,
        head_dim: int | None = None,
        num_attention_experts: int = 4,
        attention_top_k: int = 2,
        num_mlp_experts: int = 32,
        mlp_expert_size: int = 32,
        mlp_top_k: int = 4,
        mlp_entropy_coef: float = 0.01,
        attention_entropy_coef: float = 0.001,
        rope_fraction: float = 0.5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        layer_norm_eps: float = 1e-5,
        expert_implementation: str = "dense",
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        positive = {
            "vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
            "group_size": group_size, "num_attention_heads": num_attention_heads,
            "num_attention_experts": num_attention_experts, "attention_top_k": attention_top_k,
            "num_mlp_experts": num_mlp_experts, "mlp_expert_size": mlp_expert_size, "mlp_top_k": mlp_top_k,
        }  # fmt: skip
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if num_hidden_layers % group_size:
            raise ValueError(
                f"`group_size` ({group_size}) must divide `num_hidden_layers` ({num_hidden_layers}): the group of "
                "distinct layers is repeated a whole number of times."
            )
        if attention_top_k > num_attention_experts:
            raise ValueError(
                f"`attention_top_k` ({attention_top_k}) must be <= `num_attention_experts` ({num_attention_experts})."
            )
        if mlp_top_k > num_mlp_experts:
            raise ValueError(f"`mlp_top_k` ({mlp_top_k}) must be <= `num_mlp_experts` ({num_mlp_experts}).")
        if head_dim is None:
            if hidden_size % num_attention_heads:
                raise ValueError(
                    f"`hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` "
                    f"({num_attention_heads}) when `head_dim` is None."
                )
            head_dim = hidden_size // num_attention_heads
        if not 0.0 <= rope_fraction <= 1.0:
            raise ValueError(f"`rope_fraction` must be in [0, 1], got {rope_fraction!r}.")
        for name, value in (("mlp_entropy_coef", mlp_entropy_coef), ("attention_entropy_coef", attention_entropy_coef)):
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value!r}.")
        if expert_implementation not in ("dense", "gathered"):
            raise ValueError(f"`expert_implementation` must be 'dense' or 'gathered', got {expert_implementation!r}.")
        if tie_word_embeddings:
            raise ValueError("`tie_word_embeddings` must be False: the comparison uses untied embeddings.")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.group_size = group_size
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.num_attention_experts = num_attention_experts
        self.attention_top_k = attention_top_k
        self.num_mlp_experts = num_mlp_experts
        self.mlp_expert_size = mlp_expert_size
        self.mlp_top_k = mlp_top_k
        self.mlp_entropy_coef = mlp_entropy_coef
        self.attention_entropy_coef = attention_entropy_coef
        self.rope_fraction = rope_fraction
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.expert_implementation = expert_implementation
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_rotary_channels(self) -> int:
        """Channels of each query/key head that RoPE rotates (an even number)."""
        rotated = int(self.rope_fraction * self.head_dim)
        return rotated - rotated % 2


def expert_plan(expert: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """How `expert_matmul` lays out rows routed to `expert` `(P,)`: the sort order, each sorted row's expert and
    rank within it, and the busiest expert's count (read on the host: one sync)."""
    order = torch.argsort(expert, stable=True)
    sorted_expert = expert[order]
    counts = torch.bincount(sorted_expert, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(expert), device=expert.device) - starts[sorted_expert]
    return order, sorted_expert, rank, int(counts.max()) if len(expert) else 0


def expert_matmul(rows: torch.Tensor, plan: tuple, weight: torch.Tensor) -> torch.Tensor:
    """`rows[i] @ weight[expert[i]]` for every row i without a loop over experts: the rows, sorted by expert
    (`plan` = `expert_plan(expert, E)`), are padded to the busiest expert's count and multiplied in one
    `torch.bmm`. rows `(P, d_in)`, weight `(E, d_in, d_out)`; returns `(P, d_out)`."""
    order, sorted_expert, rank, capacity = plan
    padded = rows.new_zeros(weight.shape[0], capacity, rows.shape[-1]).index_put((sorted_expert, rank), rows[order])
    products = torch.bmm(padded, weight)[sorted_expert, rank]
    return products.new_empty(products.shape).index_copy(0, order, products)


def negative_entropy_of_mean(logits: torch.Tensor) -> torch.Tensor:
    """Σ_e p[e] log p[e], p = softmax(logits) averaged over dim 0 (the tokens); logits `(N, ..., E)`, the middle
    dimensions (e.g. heads) are kept. Computed in log space (log-mean-exp of the log-probabilities)."""
    log_p = torch.logsumexp(F.log_softmax(logits.float(), dim=-1), dim=0) - math.log(logits.shape[0])
    return (log_p.exp() * log_p).sum(-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class MoEUTRotary(nn.Module):
    """RoPE on the first `num_rotary_channels` channels of each head; the rest pass unrotated."""

    def __init__(self, config: MoEUTConfig):
        super().__init__()
        self.channels = config.num_rotary_channels
        exponent = torch.arange(0, self.channels, 2, dtype=torch.float32) / max(self.channels, 1)
        self.register_buffer("inv_freq", 1.0 / config.rope_theta**exponent, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, heads, seq, head_dim)
        if self.channels == 0:
            return x
        angles = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)[:, None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        rotated, rest = x[..., : self.channels], x[..., self.channels :]
        rotated = rotated * angles.cos().to(x.dtype) + rotate_half(rotated) * angles.sin().to(x.dtype)
        return torch.cat((rotated, rest), dim=-1)


class SwitchHeadAttention(nn.Module):
    """Dense queries and keys; value and output projections as sigmoid-gated top-k experts per head."""

    def __init__(self, config: MoEUTConfig):
        super().__init__()
        heads, experts, head_dim, hidden = (
            config.num_attention_heads, config.num_attention_experts, config.head_dim, config.hidden_size,
        )  # fmt: skip
        self.num_heads, self.num_experts, self.head_dim, self.top_k = heads, experts, head_dim, config.attention_top_k
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.v_experts = nn.Parameter(torch.empty(heads * experts, hidden, head_dim))  # expert h * E + e
        self.o_experts = nn.Parameter(torch.empty(heads * experts, head_dim, hidden))
        self.v_router = nn.Linear(hidden, heads * experts, bias=False)
        self.o_router = nn.Linear(hidden, heads * experts, bias=False)
        self.rotary = MoEUTRotary(config)
        self.dense = config.expert_implementation == "dense"

    def _select(self, router: nn.Linear, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits `(N, H, E)`, the top-k gates `(N, H, k)` and their experts' indices `(N, H, k)`."""
        logits = router(normed).view(-1, self.num_heads, self.num_experts)
        gates, index = torch.sigmoid(logits).topk(self.top_k, dim=-1, sorted=False)
        return logits, gates, index

    def forward(self, x: torch.Tensor, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq, hidden = x.shape
        tokens, flat_x, flat_n = batch * seq, x.reshape(-1, hidden), normed.reshape(-1, hidden)
        v_logits, v_gates, v_index = self._select(self.v_router, flat_n)
        o_logits, o_gates, o_index = self._select(self.o_router, flat_n)
        pairs = tokens * self.num_heads * self.top_k
        heads = torch.arange(self.num_heads, device=x.device)[:, None] * self.num_experts  # flat id h * E + e

        if self.dense:  # every expert of every head, the unselected ones weighted 0: one matmul each way
            v_full = torch.zeros_like(v_logits).scatter(-1, v_index, v_gates)
            every = flat_x @ self.v_experts.permute(1, 0, 2).reshape(hidden, -1)
            values = (every.view(tokens, self.num_heads, self.num_experts, -1) * v_full[..., None]).sum(2)
        else:  # every (token, head, slot) pair projects the raw residual with its expert, weighted by its gate
            token_of_pair = torch.arange(tokens, device=x.device).repeat_interleave(self.num_heads * self.top_k)
            v_plan = expert_plan((v_index + heads).reshape(pairs), len(self.v_experts))
            values = expert_matmul(flat_x[token_of_pair], v_plan, self.v_experts)
            values = (values.view(tokens, self.num_heads, self.top_k, self.head_dim) * v_gates[..., None]).sum(2)

        def heads_first(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

        query = self.rotary(heads_first(self.q_proj(normed)))
        key = self.rotary(heads_first(self.k_proj(normed)))
        attended = F.scaled_dot_product_attention(query, key, heads_first(values), is_causal=True)
        attended = attended.transpose(1, 2).reshape(tokens, self.num_heads, self.head_dim)

        # output: sum over heads and selected experts of gate * (head result @ expert)
        if self.dense:
            o_full = torch.zeros_like(o_logits).scatter(-1, o_index, o_gates)
            gated = (attended[:, :, None, :] * o_full[..., None]).reshape(tokens, -1)  # (N, H * E * d_head)
            outputs = gated @ self.o_experts.reshape(-1, hidden)
        else:
            rows = attended[:, :, None, :].expand(tokens, self.num_heads, self.top_k, self.head_dim).reshape(pairs, -1)
            o_plan = expert_plan((o_index + heads).reshape(pairs), len(self.o_experts))
            outputs = expert_matmul(rows, o_plan, self.o_experts).view(tokens, -1, hidden)
            outputs = (outputs * o_gates.reshape(tokens, -1, 1)).sum(1)
        return outputs.view(batch, seq, hidden), v_logits, o_logits


class SigmaMoE(nn.Module):
    """σ-MoE: sigmoid-gated top-k two-layer ReLU experts; the router reads the normalised input."""

    def __init__(self, config: MoEUTConfig):
        super().__init__()
        self.top_k = config.mlp_top_k
        experts, width, hidden = config.num_mlp_experts, config.mlp_expert_size, config.hidden_size
        self.up = nn.Parameter(torch.empty(experts, hidden, width))
        self.down = nn.Parameter(torch.empty(experts, width, hidden))
        self.router = nn.Linear(hidden, experts, bias=False)
        self.dense = config.expert_implementation == "dense"

    def forward(self, x: torch.Tensor, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, hidden = x.shape, x.shape[-1]
        flat_x = x.reshape(-1, hidden)
        logits = self.router(normed.reshape(-1, hidden))
        gates, index = torch.sigmoid(logits).topk(self.top_k, dim=-1, sorted=False)
        if self.dense:  # every expert, the unselected ones weighted 0 (their ReLU output times a zero gate)
            full = torch.zeros_like(logits).scatter(-1, index, gates)
            experts, width = self.up.shape[0], self.up.shape[2]
            every = F.relu(flat_x @ self.up.permute(1, 0, 2).reshape(hidden, -1)).view(-1, experts, width)
            out = (every * full[..., None]).reshape(len(flat_x), -1) @ self.down.reshape(-1, hidden)
            return out.view(shape), logits
        token_of_pair = torch.arange(len(flat_x), device=x.device).repeat_interleave(self.top_k)
        plan = expert_plan(index.reshape(-1), len(self.up))  # shared by the up and down projections
        hidden_act = F.relu(expert_matmul(flat_x[token_of_pair], plan, self.up))
        out = expert_matmul(hidden_act, plan, self.down).view(len(flat_x), self.top_k, hidden)
        return (out * gates[..., None]).sum(1).view(shape), logits


class MoEUTLayer(nn.Module):
    """One distinct layer: peri-layernorm SwitchHead attention, then peri-layernorm σ-MoE, each with a residual."""

    def __init__(self, config: MoEUTConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = SwitchHeadAttention(config)
        self.mlp = SigmaMoE(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        attended, v_logits, o_logits = self.attention(x, self.attention_norm(x))
        x = x + attended
        update, mlp_logits = self.mlp(x, self.mlp_norm(x))
        return x + update, (v_logits, o_logits, mlp_logits)


class MoEUTPreTrainedModel(PreTrainedModel):
    config_class = MoEUTConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoEUTLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        config = self.config
        scale = math.sqrt(2.0 / config.num_hidden_layers)
        hidden = config.hidden_size
        if isinstance(module, SwitchHeadAttention):
            for weight in (module.q_proj.weight, module.k_proj.weight, module.v_router.weight, module.o_router.weight):
                init.normal_(weight, mean=0.0, std=scale / math.sqrt(hidden))
            init.normal_(module.v_experts, mean=0.0, std=scale / math.sqrt(hidden))
            init.normal_(module.o_experts, mean=0.0, std=scale / math.sqrt(module.num_heads * module.head_dim))
        elif isinstance(module, SigmaMoE):
            init.normal_(module.router.weight, mean=0.0, std=scale / math.sqrt(hidden))
            init.normal_(module.up, mean=0.0, std=scale / math.sqrt(hidden))
            init.normal_(module.down, mean=0.0, std=scale / math.sqrt(module.up.shape[0] * module.up.shape[2]))
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(hidden))
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MoEUTForCausalLM):
            init.normal_(module.lm_head.weight, mean=0.0, std=1.0 / math.sqrt(hidden))


class MoEUTForCausalLM(MoEUTPreTrainedModel):
    """Embedding, `num_hidden_layers` applications of `group_size` distinct MoEUT layers, LayerNorm, LM head."""

    def __init__(self, config: MoEUTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MoEUTLayer(config) for _ in range(config.group_size)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def entropy_loss(self, router_logits: list[list[tuple[torch.Tensor, ...]]]) -> torch.Tensor:
        """The weighted σ-MoE entropy balance loss from `router_logits[distinct layer][application]` =
        (value logits `(N, H, E_A)`, output logits `(N, H, E_A)`, MLP logits `(N, N_E)`)."""
        total = self.embed_tokens.weight.new_zeros((), dtype=torch.float32)
        for applications in router_logits:
            v_logits, o_logits, mlp_logits = (torch.cat(parts, dim=0) for parts in zip(*applications, strict=True))
            attention = negative_entropy_of_mean(v_logits).mean() + negative_entropy_of_mean(o_logits).mean()
            total = total + self.config.attention_entropy_coef * attention
            total = total + self.config.mlp_entropy_coef * negative_entropy_of_mean(mlp_logits)
        return total

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if attention_mask is not None:
            raise ValueError("`attention_mask` must be None: the MoEUT baseline runs full causal blocks only.")
        if input_ids.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(
                f"`input_ids` has {input_ids.shape[-1]} positions, more than `max_position_embeddings` "
                f"({self.config.max_position_embeddings})."
            )
        hidden = self.embed_tokens(input_ids)
        router_logits: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in self.layers]
        for index in range(self.config.num_hidden_layers):
            distinct = index % self.config.group_size
            hidden, logits = self.layers[distinct](hidden)
            router_logits[distinct].append(logits)
        logits = self.lm_head(self.norm(hidden))

        want_aux = self.training if output_router_logits is None else output_router_logits
        aux_loss = self.entropy_loss(router_logits) if want_aux or labels is not None else None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            loss = loss + aux_loss
        output = CausalLMOutputWithPast(loss=loss, logits=logits)
        output["aux_loss"] = aux_loss
        return output
