"""What a run trains on: feature shards read sample by sample (:mod:`.dataset`), size buckets that all fill a batch
(:mod:`.buckets`), the batch plan of every step (:mod:`.batch_plan`) and each step's random draws and network calls
(:mod:`.step_inputs`)."""
