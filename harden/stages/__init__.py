"""The stages of `harden run`, one module each; `harden.runner` knows their order. Each is a function of the run
context (`context.Run`) that writes its own artifact in the run folder."""
