mod bad_input;
mod bench;
mod configs;
mod datasets;
mod deploy;
mod fuzz;
mod reliability;
mod tiny_model;
