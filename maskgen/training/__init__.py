"""Everything that only runs inside `train.py`.

    trainer          train_and_evaluate(cfg, workdir): the stages in order, config.json, summary
    loop             StageRun and run_stage: the shared step / log / checkpoint / preemption loop
    stage_setup      batch check, restore-or-init, iterator resume and step jit shared by the stages
    rng              named PRNG purposes (one salt table for the whole run)
    tokenizer_stage  VQGAN + discriminator stage; tokenizer_step its jitted step
    transformer_stage  MaskGIT stage on frozen tokens; transformer_step its jitted step
    train_state      TrainState (params, EMA, optimiser state) and sharded initialisation
    optimizer        AdamW + schedules from a stage block
    iterators        per-process batch iterators with checkpointable positions
    token_cache      pre-tokenises the train split once (read back by iterators.TokenCacheReader)
    quality          end-of-training quality report (quality.json)
    writers          progress bar and TensorBoard events
"""
