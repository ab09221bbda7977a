"""File formats and the particle table: RELION/Topaz STAR tables (parsed once into ``particles.ParticleTable``),
MRC stacks, cryoSPARC datasets, Topaz picks, MNIST digits, the STAR columns tvae-em writes, and safe (atomic)
writing."""
