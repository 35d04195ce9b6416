"""LightningModules: the branch modules differ only in which branches they train."""
from realisid.modules.branch_module import GlobalBranchModule, JointModule, LocalBranchModule, RealisIDModule, build_module

__all__ = ["RealisIDModule", "LocalBranchModule", "GlobalBranchModule", "JointModule", "build_module"]
