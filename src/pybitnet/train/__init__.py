"""Quantization-aware training of BitNet b1.58 models.

    qat      TrainableBitNet: latent float weights, the inference math in the forward, STE gradients, export()
    loss     cross-entropy over vocabulary chunks
    data     tokenizer training, held-out split, seeded token windows, atomic writes
    trainer  TrainOptions / Run: AdamW with warmup + cosine decay, validation, resumable checkpoints, outputs
"""
