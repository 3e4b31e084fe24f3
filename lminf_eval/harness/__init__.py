"""The harness around the library: the CLI (`cli`), the task API (`task`), the runner (`runner`), results
folders (`results`, `report`), inputs (`data`, `models`, `config`), measurement (`measure`) and the
lm-evaluation-harness model type (`lmeval_model`). `import lminf_eval` does not import this package."""
