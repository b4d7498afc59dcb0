//! The power-on contract between the VMM and its guests.
#![no_std]
