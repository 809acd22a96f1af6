//! placeholder: filled by the ember-boot split.
