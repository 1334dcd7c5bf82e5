"""Third-party segmentation models for the conversion sweep, random init, built from configs.

Each factory returns a small instance of a public architecture (nothing is downloaded):
segmentation_models_pytorch decoders over several encoder families, and HuggingFace
segmenters built from their configs.
"""
NUM_CLASSES = 5


# ----------------------------------------------------------------- segmentation_models_pytorch
def smp_unet_resnet18():
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, classes=NUM_CLASSES)


def smp_fpn_efficientnet_b0():
    import segmentation_models_pytorch as smp

    return smp.FPN("efficientnet-b0", encoder_weights=None, classes=NUM_CLASSES)


def smp_deeplabv3plus_mobilenet_v2():
    import segmentation_models_pytorch as smp

    return smp.DeepLabV3Plus("mobilenet_v2", encoder_weights=None, classes=NUM_CLASSES)


def smp_segformer_mit_b0():
    import segmentation_models_pytorch as smp

    return smp.Segformer("mit_b0", encoder_weights=None, classes=NUM_CLASSES)


def smp_unet_hrnet_w18_small():
    import segmentation_models_pytorch as smp

    return smp.Unet("tu-hrnet_w18_small", encoder_weights=None, classes=NUM_CLASSES)


def smp_pan_convnext_atto():
    import segmentation_models_pytorch as smp

    return smp.PAN("tu-convnext_atto", encoder_weights=None, classes=NUM_CLASSES)


# ----------------------------------------------------------------- HuggingFace transformers
def hf_segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    return SegformerForSemanticSegmentation(SegformerConfig(
        num_labels=NUM_CLASSES, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=64,
        num_attention_heads=[1, 1, 2, 4]))


def hf_upernet_convnext():
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, hidden_size=64, num_labels=NUM_CLASSES,
                                                        use_auxiliary_head=False))


def hf_upernet_swin():
    from transformers import SwinConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, hidden_size=64, num_labels=NUM_CLASSES,
                                                        use_auxiliary_head=False))


def hf_dpt():
    from transformers import DPTConfig, DPTForSemanticSegmentation

    return DPTForSemanticSegmentation(DPTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=64, patch_size=16,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32,
        num_labels=NUM_CLASSES, use_auxiliary_head=False))


def hf_beit():
    from transformers import BeitConfig, BeitForSemanticSegmentation

    return BeitForSemanticSegmentation(BeitConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=64, patch_size=16,
        out_indices=[0, 1, 2, 3], num_labels=NUM_CLASSES, use_auxiliary_head=False, pool_scales=[1, 2]))


def hf_mobilevit():
    from transformers import MobileViTConfig, MobileViTForSemanticSegmentation

    return MobileViTForSemanticSegmentation(MobileViTConfig(
        image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 160],
        num_labels=NUM_CLASSES, aspp_out_channels=32))


def smp_dpt_vit_tiny():
    import segmentation_models_pytorch as smp

    return smp.DPT("tu-vit_tiny_patch16_224", encoder_weights=None, classes=NUM_CLASSES, img_size=64,
                   decoder_intermediate_channels=(32, 64, 96, 96), decoder_fusion_channels=32)
