//! Carrel VMM.
