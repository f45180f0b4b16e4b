"""SAM's mask decoder regrouped into the graphs the OpenVINO runtime compiles (``runtimes``).

The same arithmetic as ``MaskDecoder.predict_masks`` within float rounding (tested in float32):
the attentions to and from the image work on the few prompt tokens' side (``two_way``), and a
click's box search decodes its candidates up to the upscaling (``SearchGraph``), upscaling only
the winner (``UpscaleGraph``); ``DecoderGraph`` is the whole decoder in one graph.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch


def projections(linear: torch.nn.Linear, heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A projection's weight and bias per head: (heads, d, C), (heads, d)."""
    return linear.weight.view(heads, -1, linear.weight.shape[1]), linear.bias.view(heads, -1)


def tokens_to_image(attn, q: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention`` of the prompt tokens ``q`` (K, T, C) to the image: keys from ``a`` (the
    image tokens plus their positional encoding), values from ``x`` (both (K or 1, HW, C)). The
    image-side projections are moved to the token side: each head's query times the key
    projection (qW_k) meets the image tokens directly, and the weights' product with the image
    tokens (PX) meets the value projection after. The key bias adds the same to a row's scores
    and the weights of a row sum to 1, so the result is the module's (within float rounding),
    with fewer multiplications (2 x HW x C x heads x T instead of 2 x HW x C x C/2). The softmax is
    divided out after the product with the image tokens (the same weights, without OpenVINO's
    softmax over HW). The timings: ``benchmarks/results/runtime_cpu.md``."""
    n, (k, t, _) = attn.num_heads, q.shape
    qh = attn.q_proj(q).view(k, t, n, -1).transpose(1, 2)  # (K, n, T, d)
    wk, _ = projections(attn.k_proj, n)
    scores = (qh @ wk).reshape(k, n * t, -1) @ a.transpose(1, 2) / math.sqrt(qh.shape[-1])  # (K, nT, HW)
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    wv, bv = projections(attn.v_proj, n)
    out = ((e @ x) / e.sum(-1, keepdim=True)).view(k, n, t, -1) @ wv.transpose(1, 2) + bv[:, None]  # (K, n, T, d)
    return attn.out_proj(out.transpose(1, 2).reshape(k, t, -1))


def image_to_tokens(attn, a: torch.Tensor, q: torch.Tensor, v: torch.Tensor, shared: bool) -> torch.Tensor:
    """SAM's ``Attention`` of the image tokens (queries from ``a``, (K or 1, HW, C)) to the prompt
    tokens (keys from ``q``, values from ``v``, (K, T, C)) -> (K, HW, C). The output projection is
    applied to the T values, not to the HW outputs; the query projection moves to the token side
    too (W_q^T k per head), unless the image is ``shared`` by the K candidates (then it is
    projected once and broadcast). The same result within float rounding."""
    n, (k, t, _) = attn.num_heads, q.shape
    kh = attn.k_proj(q).view(k, t, n, -1).transpose(1, 2)  # (K, n, T, d)
    d = kh.shape[-1]
    vh = attn.v_proj(v).view(k, t, n, d).transpose(1, 2)
    vo = (vh @ attn.out_proj.weight.view(-1, n, d).permute(1, 2, 0)).reshape(k, n * t, -1)  # (K, nT, C)
    vo = vo + attn.out_proj.bias / n  # each head's weights sum to 1: the bias, added once (not after the
    # product: OpenVINO's CPU plugin cannot compile that bias with a dynamic number of tokens)
    if shared:
        qa = attn.q_proj(a).view(a.shape[0], -1, n, d).transpose(1, 2)  # (1, n, HW, d)
        scores = (qa @ kh.transpose(2, 3)).transpose(1, 2)  # (K, HW, n, T)
    else:
        wq, bq = projections(attn.q_proj, n)
        m = (wq.transpose(1, 2) @ kh.transpose(2, 3)).permute(0, 2, 1, 3).reshape(k, -1, n * t)  # (K, C, nT)
        scores = (a @ m + (kh @ bq[:, :, None]).reshape(k, 1, n * t)).view(k, -1, n, t)
    weights = torch.softmax(scores / math.sqrt(d), dim=-1).reshape(k, -1, n * t)
    return weights @ vo


def two_way(transformer, image: torch.Tensor, pe: torch.Tensor, tokens: torch.Tensor, shared: bool):
    """``TwoWayTransformer.forward`` for OpenVINO: image tokens (K or 1, HW, C), their positional
    encoding (1, HW, C), prompt tokens (K, T, C) -> (tokens, image tokens (K, HW, C)), each
    image-side attention folded (``tokens_to_image``, ``image_to_tokens``) except, where the
    image is ``shared`` by the K candidates, the first layer's attention to it (its projections
    are computed once)."""
    queries, keys = tokens, image
    for i, layer in enumerate(transformer.layers):
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        a, once = keys + pe, shared and i == 0
        attend = layer.cross_attn_token_to_image
        out = attend(q=queries + tokens, k=a, v=keys) if once else tokens_to_image(attend, queries + tokens, a, keys)
        queries = layer.norm2(queries + out)
        queries = layer.norm3(queries + layer.mlp(queries))
        out = image_to_tokens(layer.cross_attn_image_to_token, a, queries + tokens, queries, once)
        keys = layer.norm4(keys + out)
    out = tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + pe, keys)
    return transformer.norm_final_attn(queries + out), keys


class SearchGraph(torch.nn.Module):
    """The mask decoder up to its upscaling, for K candidate prompts on one image with no mask
    prompt: (embeddings (1, C, h, w), sparse prompts (K, N, C), dense prompt (1, C, h, w); or
    dense prompts (K, C, h, w), as ``DecoderGraph`` gives it, with ``shared`` off) ->
    (image tokens after the transformer (K, h*w, C), the mask tokens' hypernetwork outputs
    (K, M, c), IoU predictions (K, M)). The image is not copied K times (the decoder's
    ``repeat_interleave``): the first layer's image-side projections are the same for every
    candidate and broadcast, so they are computed once; the other attentions to and from the
    image are folded (``two_way``; timings in ``benchmarks/results/runtime_cpu.md``)."""

    def __init__(self, backbone, shared: bool = True) -> None:
        super().__init__()
        self.decoder, self.shared = backbone.mask_decoder, shared
        self.register_buffer("pe", backbone.prompt_encoder.get_dense_pe().detach().clone())

    def forward(self, z, sparse, dense):
        d = self.decoder
        out_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens[None].expand(sparse.shape[0], -1, -1), sparse], dim=1)
        image, pe = (z + dense).flatten(2).transpose(1, 2), self.pe.flatten(2).transpose(1, 2)
        queries, keys = two_way(d.transformer, image, pe, tokens, self.shared)
        hyper = torch.stack([mlp(queries[:, 1 + i]) for i, mlp in enumerate(d.output_hypernetworks_mlps)], dim=1)
        return keys, hyper, d.iou_prediction_head(queries[:, 0])


class UpscaleGraph(torch.nn.Module):
    """The rest of the mask decoder: (image tokens (B, h*w, C), hypernetwork outputs (B, M, c)) ->
    mask logits (B, M, 4h, 4w), computed token by token. The decoder's upscaling (2x2 stride-2
    transposed convolution, channel LayerNorm, GELU, the same again without the norm) maps each
    image token to its own 4x4 block of pixels, so each transposed convolution is one matrix
    product per token (its 2x2 outputs side by side) and the blocks are put in place at the end:
    the same arithmetic as the convolutions (equal within 1e-5 in float32), which OpenVINO runs
    faster than the convolutions (``benchmarks/results/runtime_cpu.md``)."""

    def __init__(self, backbone) -> None:
        super().__init__()
        first, norm, self.act1, second, self.act2 = backbone.mask_decoder.output_upscaling
        self.grid = backbone.embedding_shape[1:]
        for name, conv in (("1", first), ("2", second)):  # (in, out, 2, 2) -> (in, 2*2*out): (a, b, out)
            self.register_buffer("w" + name, conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.in_channels, -1).clone())
            self.register_buffer("b" + name, conv.bias.detach().repeat(4).clone())
        self.register_buffer("norm_weight", norm.weight.detach().clone())
        self.register_buffer("norm_bias", norm.bias.detach().clone())
        self.eps = norm.eps

    def forward(self, keys, hyper):
        (h, w), (b, n, _), m = self.grid, keys.shape, hyper.shape[1]
        y = (keys @ self.w1 + self.b1).view(b, n, 4, -1)  # the first convolution: 2x2 sub-pixels per token
        mean = y.mean(-1, keepdim=True)
        y = (y - mean) / torch.sqrt((y - mean).pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.act1(y * self.norm_weight + self.norm_bias)
        y = self.act2(y @ self.w2 + self.b2).view(b, n * 16, -1)  # the second: 4x4 sub-pixels per token
        masks = (hyper @ y.transpose(1, 2)).view(b, m, h, w, 2, 2, 2, 2)  # (token row, col, a, b, a2, b2)
        return masks.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, m, 4 * h, 4 * w)


class DecoderGraph(torch.nn.Module):
    """The mask decoder with the prompt encoder's positional encoding as a constant: (embeddings
    (1, C, h, w), sparse prompts (B, N, C), dense prompts (B, C, h, w)) -> all mask logits
    (B, 4, 4h, 4w) and IoU predictions (B, 4): ``SearchGraph`` then ``UpscaleGraph``."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.search = SearchGraph(backbone, shared=False)  # each object its own image (its dense prompt)
        self.upscale = UpscaleGraph(backbone)

    def forward(self, z, sparse, dense):
        keys, hyper, iou = self.search(z, sparse, dense)
        return self.upscale(keys, hyper), iou
