"""`harden audit`: what an attacker with the weights still gets back (prompts, paraphrases, the embedding attack),
with a control on images the model never saw. See docs/audit.md."""
