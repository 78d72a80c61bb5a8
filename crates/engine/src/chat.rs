//! chat (in progress)
