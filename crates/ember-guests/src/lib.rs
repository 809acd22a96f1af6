//! Small x86-64 guests assembled in Rust (iced-x86): Ember's demo guest and its test guests
