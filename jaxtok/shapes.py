"""The shape legend: one letter per kind of size, with one meaning throughout jaxtok (code, tests and scripts).

A name ends in `_` and the letters of its axes, in order: `x_BTD` is [B, T, D]. Einsum strings use the same letters
in lower case ("btd,dnh->btnh": its h is H), and shapes in brackets in docstrings and comments use them as they are.

    A   micro-batches of one step (gradient accumulation)
    B   batch: sequences of a micro-batch, of an evaluation batch, or prompts being generated from
    C   positions of one chunk: of the fused loss (`jaxtok.loss`), or of attention's queries (`jaxtok.attention`)
    D   hidden size
    E   sequences of a data set: the rows of its [E, T] arrays, which one epoch covers (`jaxtok.data`)
    F   MLP intermediate size
    G   tokens generated after the first, one scan step each (`jaxtok.generate`)
    H   head dim
    I   a projection's input features, flattened (`jaxtok.lora`; N*H for o_proj)
    J   query heads per key/value head, N/K (grouped-query attention)
    K   key/value heads
    L   layers
    M   trainable token rows of one table (`jaxtok.tokens`)
    N   query heads
    O   a projection's output features, flattened (`jaxtok.lora`; N*H for q_proj)
    P   prompt length: every prompt left-padded to the longest (`jaxtok.generate`)
    R   LoRA rank
    S   key length: slots of the sequence, or of the KV cache
    T   query length: positions of the sequence
    U   vocabulary rows of one block of the fused loss (`jaxtok.loss`)
    V   vocabulary
    1   an axis of size one (`logits_B1V`)

Sizes built from letters are written as products and quotients (N*H, H/2, T/C). Letters are sizes only in shapes;
formulas call matrices what PEFT calls them (W a frozen weight, A and B a LoRA adapter's two factors).
"""
