"""elrea inside other tools: `lm_eval` (an lm-evaluation-harness model backend)."""
