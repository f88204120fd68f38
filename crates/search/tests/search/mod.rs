mod baselines;
mod strategies;
