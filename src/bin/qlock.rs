//! STUB — the qlock command-line tool is being written.

fn main() {}
