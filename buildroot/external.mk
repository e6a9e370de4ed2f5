include $(sort $(wildcard $(BR2_EXTERNAL_TALKBOX_PATH)/package/*/*.mk))
