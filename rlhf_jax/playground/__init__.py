"""The synthetic playground: instruction tasks with a programmatic gold reward (`tasks`),
simulated labelers (`labelers`), its data as JSONL files (`files`), its tokenizer
(`tokenizer`) and a token-level sorting task (`sorting`). Nothing is downloaded."""
