//! attn-verify's integration tests in one binary: verification through the public API
//! on hand-built groups (synthetic.rs) and on synthetic traces made to lie (hostile.rs).

mod hostile;
mod synthetic;
