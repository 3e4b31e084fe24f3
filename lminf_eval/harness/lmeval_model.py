"""Any method inside EleutherAI's lm-evaluation-harness: the `lminf` model type.

An `HFLM` (lm-eval's own HuggingFace wrapper, so batching, loglikelihood, rolling loglikelihood and
generate_until are lm-eval's code) around a model loaded by `load_model` and patched with a method, e.g.

    lm-eval-lminf run --model lminf --model_args pretrained=smollm2-135m,method=lm-infinite,n_global=10 ...

(`lm-eval-lminf`, in `lmeval_cli`, is lm-eval's own command line with this type registered: lm-eval 0.4.13
finds model types only in its own package, so its plain `lm_eval` command needs `import lminf_eval.harness.lmeval_model`
first; from Python, `simple_evaluate(model="lminf", model_args=...)` after that import.) `lminf-eval lm-eval`
runs several methods through this class on one model load. lm-eval is an optional extra:
`pip install 'lminf-eval[lm-eval]'`.
"""

from __future__ import annotations

from ..errors import INSTALL_LM_EVAL, UserError

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # the bridge is an optional extra
    raise UserError(INSTALL_LM_EVAL) from err

from ..methods import Method, apply_method, parse_method
from ..rope_scaling import reset_dynamic_rope
from ..settings import NAMES
from .models import load_model
from .runner import resolve_device, resolve_run


@register_model("lminf")
class LMInfLM(HFLM):
    """lm-eval's HFLM on a model with a method applied. `method` is a method spec (`lm-infinite`,
    `self-extend:group_size=16`, `vanilla`, ...); settings may also come as their own model_args
    (`n_global=10`). `truncate` keeps the last L_pre tokens of every context (lm-eval's own left
    truncation at max_length = L_pre); the others read contexts up to `max_length` (default: uncut)."""

    def __init__(
        self,
        pretrained,
        method: str = "lm-infinite",
        pretraining_length: int | None = None,
        target_length: int | None = None,
        tokenizer=None,
        dtype: str = "auto",
        device: str | None = None,
        max_length: int | None = None,
        **kwargs,
    ) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in NAMES}
        spec = method + "".join(f":{k}={v}" for k, v in options.items())
        chosen = parse_method(spec)  # (a typo fails before the model loads)
        name = pretrained if isinstance(pretrained, str) else None
        if name is not None:  # a registry name, local dir, .gguf file or hub id, as in lminf-eval
            resolved, dtype = resolve_device(device or "auto", dtype)
            device = str(resolved)
            pretrained, loaded_tokenizer = load_model(name, dtype, device)
            tokenizer = tokenizer or loaded_tokenizer
        setup = resolve_run(
            name,
            [spec],
            pretraining_length=pretraining_length,
            config=pretrained.config,
            target_length=target_length or max_length,
        )
        l_pre = setup.l_pre
        if not l_pre:
            raise UserError("the model's config has no pretraining length: pass pretraining_length=N")
        self.method, self.pretraining_length = chosen, l_pre
        self.settings = setup.settings[chosen.label]
        self.undo = apply_method(pretrained, self.settings, l_pre)
        max_length = context_limit(chosen, l_pre, max_length)
        device = device or str(pretrained.device)
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, max_length=max_length, device=device, **kwargs)

    def remove(self) -> None:
        """Take the method off the model (it stays loaded, as it was before)."""
        self.undo(self.model)

    # Dynamic NTK: transformers keeps the base a longer request grew until one shorter than L_pre; each request
    # starts from L_pre's base, so its rotation follows its own length (a no-op for every other method).
    def _model_call(self, *args, **kwargs):
        reset_dynamic_rope(self.model)
        return super()._model_call(*args, **kwargs)

    def _model_generate(self, *args, **kwargs):
        reset_dynamic_rope(self.model)
        return super()._model_generate(*args, **kwargs)


# lm-eval cuts every context to its model's max_length from the left; these methods are meant to read any
# length, and vanilla is the baseline that tries, so by default nothing is cut.
UNCUT = 1 << 24


def context_limit(method: Method, l_pre: int, asked: int | None) -> int:
    """lm-eval's max_length for `method`: `truncate` keeps the last L_pre tokens (context and answer), the
    others what the user asked for, else everything."""
    return l_pre if method.truncate else asked or UNCUT
