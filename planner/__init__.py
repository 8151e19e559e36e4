"""Goal-conditioned planning in latent space: CEM, gradient descent, MPC, simulator evaluation."""
