"""llama.cpp loading settings of chat.load_llama."""

import llama_cpp.llama as llama_module

from mta_local.chat import _without_extra_buffers


def test_extra_buffers_off_only_inside():
    assert llama_module.llama_cpp.llama_model_default_params().use_extra_bufts

    with _without_extra_buffers(True):
        assert not llama_module.llama_cpp.llama_model_default_params().use_extra_bufts

    assert llama_module.llama_cpp.llama_model_default_params().use_extra_bufts


def test_extra_buffers_untouched_when_disabled():
    with _without_extra_buffers(False):
        assert llama_module.llama_cpp.llama_model_default_params().use_extra_bufts
