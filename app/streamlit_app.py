"""CKA Prune dashboard: ``streamlit run app``.

One page per step (``st.navigation``): Model & data → CKA heatmap → Removal scores → Prune → Compare → Export.
The sidebar always shows the active model, data and device. The bundled digits demo is loaded on the first run,
so the app works offline in seconds. The pages are thin views over :mod:`cka_analysis`; the helpers in
``app/dashboard`` hold the session state, the cached loading and the background jobs.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `streamlit run` adds it; AppTest and other launchers may not
    sys.path.insert(0, str(HERE))

import streamlit as st  # noqa: E402
from dashboard import jobs, state  # noqa: E402
from dashboard.ui import count  # noqa: E402

# Widget values that must survive page switches (Streamlit forgets a widget's value when its page is not shown).
PERSISTENT = (
    "device_choice", "md_source", "md_registry", "md_weights", "md_classes", "md_ckpt_arch", "md_ckpt_classes",
    "md_timm_name", "md_ext_weights", "md_hf_dir", "md_hf_random", "md_ext_classes", "md_ext_patterns",
    "md_data_kind", "md_data_root", "md_download", "md_weights_download", "md_n_calib", "md_seed",
    "hm_kernel", "hm_debiased", "hm_cross_run", "hm_size", "md_test_samples",
    "sc_criterion", "sc_debiased", "sc_compare",
    "pr_mode", "pr_target_kind", "pr_macs", "pr_params", "pr_blocks", "pr_chosen", "pr_criterion", "pr_iterative",
    "pr_ft_unit", "pr_ft_steps", "pr_ft_epochs", "pr_lr", "pr_distill", "pr_step_steps", "pr_eval_samples",
    "pr_show_run",
    "cmp_models", "cmp_kinds", "cmp_samples", "cmp_batch", "cmp_repeats",
    "ex_model", "ex_formats",
)


def _persist_widgets() -> None:
    for key in PERSISTENT:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def _sidebar() -> None:
    a = state.active()
    with st.sidebar:
        st.markdown("### CKA Prune")
        if a is None:
            st.warning("No model loaded")
        else:
            st.markdown(f"**Model** · {a.model_label}")
            st.caption(f"{count(a.macs)} MACs · {count(a.params)} parameters · {len(a.blocks)} blocks "
                       f"({len(a.removable)} removable)")
            st.markdown(f"**Data** · {a.data_label}")
            if state.runs():
                st.caption(f"{len(state.runs())} pruning run(s) in this session")
        opts = state.device_options()
        st.selectbox("Device", opts, key="device_choice", help="auto = CUDA when present, else CPU")
        st.markdown(f"**Device** · {state.device_description()}")
        job = jobs.current()
        if job is not None and job.running:
            position = jobs.QUEUE.position(job)
            where = f"queued, position {position}" if position is not None else jobs.progress_text(job)
            st.caption(f":material/hourglass_top: {job.label} ({where})")


st.set_page_config(page_title="CKA Prune", page_icon="✂️", layout="wide")
state.configure_threads()
_persist_widgets()
state.ensure_default()
state.apply_query_model()
state.configure_gc()  # after the first load: see its docstring (jobs ran 4-6x slower without)

PAGES = [
    st.Page("views/model_data.py", title="Model & data", icon=":material/inventory_2:", default=True),
    st.Page("views/heatmap.py", title="CKA heatmap", icon=":material/grid_on:"),
    st.Page("views/scores.py", title="Removal scores", icon=":material/bar_chart:"),
    st.Page("views/prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("views/export.py", title="Export", icon=":material/download:"),
]
page = st.navigation(PAGES)
_sidebar()
page.run()
