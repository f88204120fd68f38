mod strategies;
