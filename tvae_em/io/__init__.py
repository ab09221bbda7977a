"""File formats: RELION/Topaz STAR tables, MRC stacks, Topaz pick lists, and safe (atomic) writing."""
