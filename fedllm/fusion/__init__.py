"""Server-side fusion: the pipeline from client updates to the new global model
(:mod:`.pipeline`), LoRA updates as weight deltas (:mod:`.lora_products`) and central DP
(:mod:`.privacy`)."""
