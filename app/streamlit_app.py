"""CKA Prune dashboard: ``streamlit run app``."""

import streamlit as st

st.set_page_config(page_title="CKA Prune", layout="wide")
st.title("CKA Prune")
st.write("Remove whole residual blocks chosen with Centered Kernel Alignment.")
