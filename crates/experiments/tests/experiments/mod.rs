mod bad_input;
mod bench;
mod configs;
mod datasets;
mod fuzz;
mod reliability;
mod tiny_model;
